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

With ``top_k``, the same pass also gives what each of the 5L + 1 distinct policies predicts at each token (its top-k
tokens and the sampled token's probability and rank): ``EntropyEngine.analyse_batch`` returns them as a second table,
one row per (token, state).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import TokenizedSample
from ..errors import IPolicyError
from ..models import LoadedModel
from .policy import NormMode, PolicyHead, Predictions
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
    top_k: int = 0  # what each policy predicts: its top_k tokens, and the sampled token's probability and rank


# The predictions table names each distinct state: the engine's queue key -> (state, layer offset). resid l is h_l
# (l = 0: the embeddings; l = L: the model's real policy), the others are the modules' inputs and outputs of layer l.
STATES = {"resid": "resid", "ln1": "attn_in", "attn": "attn_out", "ln2": "ffn_in", "ffn": "ffn_out"}


class _StateQueue:
    """Collects selected states from hooks and turns them into entropies (and, with ``top_k``, predictions)
    ``chunk`` rows at a time. Every key's states are the same N analysed positions in order, whose next tokens are
    ``targets`` [N].

    Only whole chunks are unembedded while the forward runs (each chunk streams all of U, so a small one costs as
    much as a full one); the rest waits for the next states or for the final flush.
    """

    def __init__(self, head: PolicyHead, chunk: int, targets: Tensor, top_k: int = 0):
        self.head, self.chunk, self.targets, self.top_k = head, chunk, targets, top_k
        self.pending: list[tuple[tuple[str, int], Tensor, int]] = []  # (key, states, index of their first row)
        self.rows = 0
        self.pieces: dict[tuple[str, int], list] = defaultdict(list)

    def push(self, key: tuple[str, int], states: Tensor) -> None:
        self.pending.append((key, states, 0))
        self.rows += states.shape[0]
        if self.rows >= self.chunk:
            self.flush(whole_chunks_only=True)

    def flush(self, whole_chunks_only: bool = False) -> None:
        n = (self.rows // self.chunk) * self.chunk if whole_chunks_only else self.rows
        if n == 0:
            return
        stacked = torch.cat([states for _, states, _ in self.pending])[:n]
        if self.top_k:
            targets = torch.cat([self.targets[first : first + len(states)] for _, states, first in self.pending])[:n]
            found = self.head.predictions(stacked, targets.to(stacked.device), self.top_k)
        else:
            found = self.head.entropy(stacked)
        offset, rest = 0, []
        for key, states, first in self.pending:
            take = min(states.shape[0], max(0, n - offset))
            if take > 0:
                self.pieces[key].append(_rows(found, offset, offset + take))
            if take < states.shape[0]:  # rows not yet unembedded stay, with their key
                rest.append((key, states[take:], first + take))
            offset += states.shape[0]
        self.pending, self.rows = rest, self.rows - n

    @property
    def entropy(self) -> dict[tuple[str, int], Tensor]:
        return {key: torch.cat([p.entropy if self.top_k else p for p in pieces]) for key, pieces in self.pieces.items()}

    @property
    def predictions(self) -> dict[tuple[str, int], Predictions]:
        return {key: Predictions(*(torch.cat(parts) for parts in zip(*(vars(p).values() for p in pieces))))
                for key, pieces in self.pieces.items()}


def _rows(found: Tensor | Predictions, start: int, stop: int) -> Tensor | Predictions:
    if isinstance(found, Tensor):
        return found[start:stop]
    return Predictions(*(value[start:stop] for value in vars(found).values()))


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

    def analyse(self, samples: list[TokenizedSample], sample_index: list[int] | None = None) -> pd.DataFrame:
        """Run one forward pass over ``samples`` (one batch) and return the long per-token table.

        Columns: sample_index, sample, position, token_id, token, text, layer, module, entropy_in, entropy_out, delta,
        cos_resid. ``position`` is the index of the state in the sequence; ``token`` is the response token its
        policy produced (at position + 1), as the vocabulary spells it (byte-level BPE: 'Ġthe'), and ``text`` the same
        token decoded (' the').
        """
        return self.analyse_batch(samples, sample_index)[0]

    @torch.inference_mode()
    def analyse_batch(self, samples: list[TokenizedSample],
                      sample_index: list[int] | None = None) -> tuple[pd.DataFrame, pa.Table | None]:
        """``analyse``'s table and, with ``top_k``, the predictions table (pyarrow; docs/definitions.md, "What a policy
        predicts"): one row per analysed token and distinct state, with columns sample_index, position, layer,
        state (resid, attn_in, attn_out, ffn_in, ffn_out), top_ids and top_probs (lists of top_k, most probable first),
        token_prob and token_rank (of the token the response continues with)."""
        n_layers = self.loaded.n_layers
        input_ids, flat_index = self.inputs(samples)
        targets = torch.tensor([t for s in samples for t in s.response_ids])
        queue = _StateQueue(self.head, self.config.token_chunk, targets, self.config.top_k)
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

        # cos_resid: a module's output against the stream it reads (docs/definitions.md §3)
        names = BridgeStates.block_hooks(self.loaded.block_layout)
        hook = BridgeStates.hook_name
        hooks = [(hook(0), record(("resid", 0)))]
        for i in range(n_layers):
            layer = i + 1
            hooks += [
                (f"blocks.{i}.{names['resid_pre']}", hold("attn_stream")),
                (f"blocks.{i}.{names['ffn_stream']}", hold("ffn_stream")),
                (f"blocks.{i}.{names['attn_in']}", record(("ln1", layer))),
                (f"blocks.{i}.{names['attn_out']}", record_with_cosine(("attn", layer), "attn_stream")),
                (f"blocks.{i}.{names['ffn_in']}", record(("ln2", layer))),
                (f"blocks.{i}.{names['ffn_out']}", record_with_cosine(("ffn", layer), "ffn_stream")),
            ]
            if layer < n_layers:
                hooks.append((hook(layer), record(("resid", layer))))
        hooks.append((hook(policy_state_key(n_layers, n_layers, self.config.norm_mode)), record(("resid", n_layers))))

        self.forward(input_ids, hooks)
        queue.flush()
        sample_index = sample_index or list(range(len(samples)))
        tokens = self._table(samples, sample_index, queue.entropy, cosine)
        return tokens, self._predictions(samples, sample_index, queue.predictions) if self.config.top_k else None

    def _predictions(self, samples, sample_index, predictions: dict[tuple[str, int], Predictions]) -> pa.Table:
        counts = [len(s.response_ids) for s in samples]
        index = np.repeat(np.asarray(sample_index, dtype=np.int64), counts)
        position = np.concatenate([np.asarray(s.analysed_positions) for s in samples]).astype(np.int32)
        columns: dict[str, list] = defaultdict(list)
        for (name, layer), found in sorted(predictions.items(), key=lambda item: (item[0][1], item[0][0])):
            k = found.top_ids.shape[1]
            columns["sample_index"].append(index)
            columns["position"].append(position)
            columns["layer"].append(np.full(len(index), layer, dtype=np.int32))
            columns["state"].append(np.full(len(index), STATES[name], dtype=object))
            columns["top_ids"].append(pa.FixedSizeListArray.from_arrays(found.top_ids.reshape(-1).int().numpy(), k))
            columns["top_probs"].append(pa.FixedSizeListArray.from_arrays(found.top_probs.reshape(-1).numpy(), k))
            columns["token_prob"].append(found.token_prob.numpy())
            columns["token_rank"].append(found.token_rank.int().numpy())
        return pa.table({name: pa.concat_arrays(parts) if isinstance(parts[0], pa.Array)
                         else pa.array(np.concatenate(parts)) for name, parts in columns.items()})

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
        decoded = np.asarray(tokenizer.batch_decode([[i] for i in token_ids.tolist()]), dtype=object)
        base = pd.DataFrame(
            {
                "sample_index": np.repeat(sample_index, [len(s.response_ids) for s in samples]),
                "sample": np.repeat([s.sample.id for s in samples], [len(s.response_ids) for s in samples]),
                "position": np.concatenate([np.asarray(s.analysed_positions) for s in samples]),
                "token_id": token_ids,
                "token": token_text,
                "text": decoded,
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
