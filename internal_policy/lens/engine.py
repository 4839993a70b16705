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
    batch_tokens: padded tokens per forward pass; token_chunk: state rows per unembedding block; linear: in norm
    mode "none", sum the layer outputs' logits from the modules' where the model's stream allows it."""

    norm_mode: NormMode = "none"
    fast: bool = False
    temperature: float = 1.0
    batch_tokens: int = 4096
    token_chunk: int = 512
    linear: bool = True


# The largest deviation of h_l from h_{l-1} + a_l + f_l, relative to max |h_l|, at which the layer outputs' logits
# are summed from the modules' (float32 rounding is ~1e-7; a bfloat16 stream's own rounding is ~4e-3).
IDENTITY_TOLERANCE = 1e-5


@dataclass
class _Rows:
    """A forward segment's analysed rows: ``flat``, their index b * T + position in the whole batch, and ``local``,
    the same rows in the segment's [B, t] states."""

    flat: Tensor
    local: Tensor


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


class _ChainQueue:
    """Holds the states of the residual chain (h_0, a_l, f_l) of the analysed rows, segment after segment, and
    turns them into entropies ``token_chunk`` rows at a time by linearity (``PolicyHead.chain_entropy``): the
    entropies of h_0, a_l, f_l and h_l (l < L; the last layer's policy reads LNf(h_L), a direct matmul) are
    appended to ``pieces`` in row order."""

    def __init__(self, engine: "EntropyEngine", pieces: dict):
        self.head, self.chunk, self.n_layers, self.pieces = engine.head, engine.config.token_chunk, engine.loaded.n_layers, pieces
        self.held: dict[tuple[str, int], list[Tensor]] = defaultdict(list)

    def push(self, key: tuple[str, int], states: Tensor) -> None:
        self.held[key].append(states)

    def flush(self, whole_chunks_only: bool = False) -> None:
        if not self.held:
            return
        stacked = {key: torch.cat(parts) for key, parts in self.held.items()}
        rows = stacked[("resid", 0)].shape[0]
        n = (rows // self.chunk) * self.chunk if whole_chunks_only else rows
        self.held = defaultdict(list, {key: [x[n:]] for key, x in stacked.items()} if n < rows else {})
        for first in range(0, n, self.chunk):
            take = lambda key: stacked[key][first : first + self.chunk]  # noqa: E731
            layers = range(1, self.n_layers + 1)
            steps = torch.stack([torch.stack([take(("attn", l)), take(("ffn", l))]) for l in layers])
            at_start, at_steps, at_sums = self.head.chain_entropy(take(("resid", 0)), steps)
            self.pieces[("resid", 0)].append(at_start)
            for l in layers:
                self.pieces[("attn", l)].append(at_steps[l - 1, 0])
                self.pieces[("ffn", l)].append(at_steps[l - 1, 1])
                if l < self.n_layers:
                    self.pieces[("resid", l)].append(at_sums[l - 1])


class EntropyEngine:
    """Computes the per-token entropy table of tokenized samples for one loaded model."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.head = loaded.policy_head(norm_mode=self.config.norm_mode, temperature=self.config.temperature,
                                       fast=self.config.fast, token_chunk=self.config.token_chunk)
        self.states = BridgeStates(loaded.bridge)
        self.linearity: str | None = None  # set on the first batch when linearity may be used (manifest)

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

    @torch.inference_mode()
    def analyse(self, samples: list[TokenizedSample], sample_index: list[int] | None = None) -> pd.DataFrame:
        """Run the forward pass over ``samples`` (one batch) and return the long per-token table.

        Columns: sample_index, sample, position, token_id, token, layer, module, entropy_in, entropy_out, delta,
        cos_resid. ``position`` is the index of the state in the sequence; ``token`` is the response token its
        policy produced (at position + 1).
        """
        if self.linear and self.linearity is None:
            self.linearity = self._check_identity(samples)
        n_layers = self.loaded.n_layers
        input_ids, flat_index = self.inputs(samples)
        queue = _StateQueue(self.head, self.config.token_chunk)
        cosine: dict[tuple[str, int], list[Tensor]] = defaultdict(list)
        held: dict[str, Tensor] = {}
        chain = _ChainQueue(self, queue.pieces)  # linearity: h_0, a_l and f_l until token_chunk rows are held
        rows: dict[str, Tensor] = {}  # the current segment's analysed positions, flat in its [B, t]

        def select(states: Tensor) -> Tensor:
            return states.reshape(-1, states.shape[-1]).index_select(0, rows["index"].to(states.device))

        def keep(key: tuple[str, int], states: Tensor) -> None:
            if self.linearity_used and key[0] in ("resid", "attn", "ffn") and (key[0] != "resid" or key[1] == 0):
                chain.push(key, states)
            else:
                queue.push(key, states)

        def record(key: tuple[str, int]):
            return lambda states, hook: keep(key, select(states))

        def hold(name: str):
            def hook_fn(states, hook):
                held[name] = select(states)

            return hook_fn

        def record_with_cosine(key: tuple[str, int], against: str):
            def hook_fn(states, hook):
                x = select(states)
                cosine[key].append(F.cosine_similarity(x.float(), held.pop(against).float(), dim=-1).cpu())
                keep(key, x)

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
            if layer < n_layers and not self.linearity_used:
                hooks.append((hook(layer), record(("resid", layer))))
        hooks.append((hook(policy_state_key(n_layers, n_layers, self.config.norm_mode)), record(("resid", n_layers))))

        order = []  # the global flat index of every analysed row, in the order the segments produce them
        for ids, index, cache in self.segments(input_ids, flat_index):
            rows["index"] = index.local
            order.append(index.flat)
            self.states.forward(ids, hooks, cache=cache)
            chain.flush(whole_chunks_only=True)
        chain.flush()
        queue.flush()
        back = torch.argsort(torch.cat(order).cpu())  # segment order -> the rows' order in flat_index
        entropy = {key: values[back] for key, values in queue.entropy.items()}
        return self._table(samples, sample_index, entropy, {key: torch.cat(v)[back] for key, v in cosine.items()})

    def segments(self, input_ids: Tensor, flat_index: Tensor) -> Iterator[tuple[Tensor, "_Rows", object]]:
        """The forward's pieces: the whole batch at once, or, with linearity (which holds the 2L + 1 states of every
        analysed row until its segment's logits are summed), column segments of about ``token_chunk`` tokens run
        one after the other with a key/value cache, so that memory stays bounded on long responses.
        Yields (input ids [B, t], the segment's analysed rows, the cache or None)."""
        width = input_ids.shape[1]
        if not self.linearity_used:
            yield input_ids, _Rows(flat_index, flat_index), None
            return
        from transformers import DynamicCache

        cache = DynamicCache(config=self.loaded.hf_model.config)
        step = max(1, self.config.token_chunk // input_ids.shape[0])
        batch, position = flat_index // width, flat_index % width
        for first in range(0, width, step):
            last = min(width, first + step)
            inside = (position >= first) & (position < last)
            local = batch[inside] * (last - first) + position[inside] - first
            yield input_ids[:, first:last], _Rows(flat_index[inside], local), cache

    @property
    def linear(self) -> bool:
        """Whether linearity may be used: norm mode "none" (LNf is not linear) and not turned off."""
        return self.config.linear and self.config.norm_mode == "none"

    @property
    def linearity_note(self) -> str:
        """For manifests: whether the layer outputs' logits were summed from the modules', and why (not)."""
        if self.config.norm_mode != "none":
            return "not used: norm mode 'final' (LNf is not linear)"
        if not self.config.linear:
            return "not used: turned off (EngineConfig.linear)"
        return self.linearity or "not checked: no batch analysed"

    @property
    def linearity_used(self) -> bool:
        return self.linear and bool(self.linearity) and self.linearity.startswith("used")

    @torch.inference_mode()
    def _check_identity(self, samples: list[TokenizedSample]) -> str:
        """Whether h_l = h_{l-1} + a_l + f_l holds for this model's hooks, on the first sample of the first batch:
        'used (...)' or 'not used: ...' with the largest deviation relative to max |h_l| (manifest: ``linearity``)."""
        input_ids, _ = self.inputs(samples[:1])
        names = BridgeStates.block_hooks(self.loaded.block_layout)
        seen: dict[str, Tensor] = {}

        def keep(name):
            def hook_fn(states, hook):
                seen[name] = states.double()

            return hook_fn

        hooks = [(BridgeStates.hook_name(0), keep("h0"))]
        for i in range(self.loaded.n_layers):
            hooks += [(f"blocks.{i}.{names['attn']}", keep(f"a{i + 1}")), (f"blocks.{i}.{names['ffn']}", keep(f"f{i + 1}")),
                      (BridgeStates.hook_name(i + 1), keep(f"h{i + 1}"))]
        self.states.forward(input_ids, hooks)
        worst = 0.0
        for l in range(1, self.loaded.n_layers + 1):
            h = seen[f"h{l}"]
            gap = (h - (seen[f"h{l - 1}"] + seen[f"a{l}"] + seen[f"f{l}"])).abs().max() / h.abs().max().clamp_min(1e-30)
            worst = max(worst, float(gap))
        if worst <= IDENTITY_TOLERANCE:
            return f"used (h_l = h_(l-1) + a_l + f_l holds to {worst:.1e} of max |h_l|)"
        return (f"not used: h_l = h_(l-1) + a_l + f_l is off by {worst:.1e} of max |h_l| (above {IDENTITY_TOLERANCE:g}: "
                f"{self.loaded.dtype} rounding or a block that adds more than a_l and f_l); direct matmuls")

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
