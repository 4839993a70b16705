"""The entropy engine: layer-wise and module-wise internal policy entropy (docs/definitions.md §1–2), streamed.

States are read through TransformerBridge hooks while the forward pass runs. Each hook keeps only the analysed
positions, queues them, and whenever ``token_chunk`` rows are queued they are unembedded and reduced to entropies
(``PolicyHead.entropy``). Memory never holds [layers x tokens x vocab] logits nor the activations of every layer.
Each distinct state is unembedded once: a layer's output h_l is the next layer's input.

Per layer l (1-based) and module, entropy_in / entropy_out / delta are:

    layer: H(h_{l-1})      -> H(h_l)          (h_0 = embeddings; for l = L the output is LNf(h_L))
    attn:  H(LN1_l(h_{l-1})) -> H(a_l)
    ffn:   H(LN2_l(m_l))     -> H(f_l)

``cos_resid`` is cos(a_l, h_{l-1}) for attn and cos(f_l, m_l) for ffn (docs/definitions.md §3); NaN for layer rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import TokenizedSample
from ..errors import IPolicyError
from ..models import LoadedModel
from .policy import NormMode, PolicyHead
from .states import BridgeStates, policy_state_key



@dataclass
class EngineConfig:
    """norm_mode: "none" (paper) or "final" (logit lens); fast: bf16 unembedding matmul; temperature of the policy;
    batch_tokens: padded tokens per forward pass; token_chunk: state rows per unembedding block."""

    norm_mode: NormMode = "none"
    fast: bool = False
    temperature: float = 1.0
    batch_tokens: int = 4096
    token_chunk: int = 512


class _StateQueue:
    """Collects selected states from hooks and turns them into entropies ``chunk`` rows at a time.

    Only whole chunks are unembedded while the forward runs (each chunk streams all of U, so a small one costs as
    much as a full one); the rest waits for the next states or for the final flush.
    """

    def __init__(self, head: PolicyHead, chunk: int):
        self.head, self.chunk = head, chunk
        self.pending: list[tuple[tuple[str, int], Tensor]] = []
        self.rows = 0
        self.pieces: dict[tuple[str, int], list[Tensor]] = defaultdict(list)

    def push(self, key: tuple[str, int], states: Tensor) -> None:
        self.pending.append((key, states))
        self.rows += states.shape[0]
        if self.rows >= self.chunk:
            self.flush(whole_chunks_only=True)

    def flush(self, whole_chunks_only: bool = False) -> None:
        n = (self.rows // self.chunk) * self.chunk if whole_chunks_only else self.rows
        if n == 0:
            return
        stacked = torch.cat([states for _, states in self.pending])
        entropy = self.head.entropy(stacked[:n])
        offset = 0
        for key, states in self.pending:
            take = min(states.shape[0], n - offset)
            if take > 0:
                self.pieces[key].append(entropy[offset : offset + take])
            offset += states.shape[0]
        # keep the rows not yet unembedded, each with its key
        rest, offset = [], 0
        for key, states in self.pending:
            start = max(0, n - offset)
            if start < states.shape[0]:
                rest.append((key, states[start:]))
            offset += states.shape[0]
        self.pending, self.rows = rest, self.rows - n

    @property
    def entropy(self) -> dict[tuple[str, int], Tensor]:
        return {key: torch.cat(pieces) for key, pieces in self.pieces.items()}


class EntropyEngine:
    """Computes the per-token entropy table of tokenized samples for one loaded model."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.head = loaded.policy_head(norm_mode=self.config.norm_mode, temperature=self.config.temperature,
                                       fast=self.config.fast, token_chunk=self.config.token_chunk)
        self.states = BridgeStates(loaded.bridge)

    def batches(self, samples: list[TokenizedSample]) -> Iterator[list[int]]:
        """Indices of samples grouped by length so that each padded batch holds about ``batch_tokens`` tokens."""
        order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
        batch: list[int] = []
        for i in order:
            width = len(samples[i].input_ids)
            if batch and width * (len(batch) + 1) > self.config.batch_tokens:
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def inputs(self, samples: list[TokenizedSample]) -> tuple[Tensor, Tensor]:
        """Right-padded input ids [B, T] and the flat indices b * T + position of the analysed positions [N].
        With a causal mask, padding after a sequence never changes its states."""
        pad = self.loaded.tokenizer.pad_token_id or 0
        width = max(len(s.input_ids) for s in samples)
        input_ids = torch.tensor([s.input_ids + [pad] * (width - len(s.input_ids)) for s in samples])
        flat_index = torch.cat([b * width + torch.tensor(list(s.analysed_positions)) for b, s in enumerate(samples)])
        return input_ids.to(self.loaded.device), flat_index.to(self.loaded.device)

    def forward(self, input_ids: Tensor, hooks: list) -> None:
        """One bridge forward with ``hooks`` (see ``BridgeStates.forward``)."""
        self.states.forward(input_ids, hooks)

    @torch.inference_mode()
    def analyse(self, samples: list[TokenizedSample], sample_index: list[int] | None = None) -> pd.DataFrame:
        """Run one forward pass over ``samples`` (one batch) and return the long per-token table.

        Columns: sample_index, sample, position, token_id, token, layer, module, entropy_in, entropy_out, delta,
        cos_resid. ``position`` is the index of the state in the sequence; ``token`` is the response token its
        policy produced (at position + 1).
        """
        n_layers = self.loaded.n_layers
        input_ids, flat_index = self.inputs(samples)

        queue = _StateQueue(self.head, self.config.token_chunk)
        cosine: dict[tuple[str, int], Tensor] = {}
        held: dict[str, Tensor] = {}

        def select(states: Tensor) -> Tensor:
            return states.reshape(-1, states.shape[-1]).index_select(0, flat_index.to(states.device))

        def record(key: tuple[str, int]):
            return lambda states, hook: queue.push(key, select(states))

        def hold(name: str):
            def hook_fn(states, hook):
                held[name] = select(states)

            return hook_fn

        def record_with_cosine(key: tuple[str, int], against: str):
            def hook_fn(states, hook):
                x = select(states)
                cosine[key] = F.cosine_similarity(x.float(), held.pop(against).float(), dim=-1).cpu()
                queue.push(key, x)

            return hook_fn

        names = BridgeStates.block_hooks(self.loaded.block_layout)
        hook = BridgeStates.hook_name
        hooks = [(hook(0), record(("resid", 0)))]
        for i in range(n_layers):
            layer = i + 1
            hooks += [
                (f"blocks.{i}.{names['resid_pre']}", hold("resid_pre")),
                (f"blocks.{i}.{names['ln1']}", record(("ln1", layer))),
                (f"blocks.{i}.{names['attn']}", record_with_cosine(("attn", layer), "resid_pre")),
                (f"blocks.{i}.{names['resid_mid']}", hold("resid_mid")),
                (f"blocks.{i}.{names['ln2']}", record(("ln2", layer))),
                (f"blocks.{i}.{names['ffn']}", record_with_cosine(("ffn", layer), "resid_mid")),
            ]
            if layer < n_layers:
                hooks.append((hook(layer), record(("resid", layer))))
        hooks.append((hook(policy_state_key(n_layers, n_layers, self.config.norm_mode)), record(("resid", n_layers))))

        self.forward(input_ids, hooks)
        queue.flush()
        return self._table(samples, sample_index, queue.entropy, cosine)

    def _table(self, samples, sample_index, entropy, cosine) -> pd.DataFrame:
        n_layers = self.loaded.n_layers
        for key, values in entropy.items():
            if not torch.isfinite(values).all():
                raise IPolicyError(
                    f"NaN or inf entropy in state {key[0]} of layer {key[1]} of '{self.loaded.name}'. "
                    "Fix: run in `dtype` float32 (half precision can overflow), or check the checkpoint's weights."
                )
        token_ids = np.concatenate([np.asarray(s.response_ids) for s in samples])
        n_tokens = len(token_ids)
        tokenizer = self.loaded.tokenizer
        token_text = np.asarray(tokenizer.convert_ids_to_tokens(token_ids.tolist()), dtype=object)
        base = pd.DataFrame(
            {
                "sample_index": np.repeat(sample_index or list(range(len(samples))), [len(s.response_ids) for s in samples]),
                "sample": np.repeat([s.sample.id for s in samples], [len(s.response_ids) for s in samples]),
                "position": np.concatenate([np.asarray(s.analysed_positions) for s in samples]),
                "token_id": token_ids,
                "token": token_text,
            }
        )
        nan = torch.full((n_tokens,), float("nan"))
        parts = []
        for layer in range(1, n_layers + 1):
            pairs = {
                "layer": (entropy[("resid", layer - 1)], entropy[("resid", layer)], nan),
                "attn": (entropy[("ln1", layer)], entropy[("attn", layer)], cosine[("attn", layer)]),
                "ffn": (entropy[("ln2", layer)], entropy[("ffn", layer)], cosine[("ffn", layer)]),
            }
            for module, (h_in, h_out, cos) in pairs.items():
                part = base.copy()
                part["layer"] = layer
                part["module"] = module
                part["entropy_in"] = h_in.numpy()
                part["entropy_out"] = h_out.numpy()
                part["delta"] = (h_out - h_in).numpy()
                part["cos_resid"] = cos.numpy()
                parts.append(part)
        return pd.concat(parts, ignore_index=True)
