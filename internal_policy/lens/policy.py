"""From a residual state to a samplable policy: pi(x) = softmax(g(U x) / temperature) (docs/definitions.md §1), g
being the model's own logit transform (identity; Gemma-2's soft-capping; a logit scale).

``PolicyHead`` is the one place in the project that turns a state into a policy. The entropy engine calls
``entropy`` (or ``predictions``, which adds what the policy predicts); the trainer calls ``log_probs`` (BuPO's
internal policy) — all go through the same unembedding.

Entropies are computed without materialising [tokens x vocab] probabilities: logits are produced in blocks of
``token_chunk`` rows x ``vocab_block`` columns (small enough to stay in cache) and folded into an online
(max, sum exp, sum exp * logit) triple, so H = log S - T / S in one pass over each logit block. ``predictions`` reads
each block once more before it is folded (docs/definitions.md §1, "What a policy predicts"): the k best groups of
``_GROUP`` (128) adjacent tokens by their largest logit, which hold the block's top-k, and a count of the logits that
outrank the sampled token's. The groups of all blocks are merged once per chunk of rows, and the top-k read from the k best.
Ties are ordered by int64 keys (the logit's bits, then the id), so ``torch.topk`` never breaks one arbitrarily.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NORM_MODES, is_number, is_whole

NormMode = Literal["none", "final"]
_EXP_FLOOR = -87.0


_GROUP = 128  # a block's columns are searched for the top-k in groups this wide
_NO_KEY = torch.iinfo(torch.int64).min  # the key of a padding entry: below every real one
_MERGE_EVERY = 16  # blocks whose candidates are held before they are merged


@dataclass
class Candidates:
    """Groups of adjacent columns that hold a policy's top-k, for N rows: the k best groups of one vocabulary block,
    or of several merged. ``best`` [N, k] the largest logit of each group; ``start`` [N, k] its first token id;
    ``width`` [N, k] its number of tokens (0: padding); ``logits`` [N, k, _GROUP] its logits (-inf past ``width``)."""

    best: Tensor
    start: Tensor
    width: Tensor
    logits: Tensor


def _order_keys(values: Tensor, ids: Tensor) -> Tensor:
    """int64 keys whose order is the predictions' order: the larger float32 value first, equal values by the lower
    id (ids < 2**31). The float's bits, flipped below zero, sort as the float does; the id fills the low 32 bits.
    With these keys ``torch.topk`` has no ties to break arbitrarily."""
    bits = torch.where(values == 0, 0.0, values).view(torch.int32)  # -0.0 becomes +0.0, which it equals
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    return (ordered << 32) | (2**31 - 1 - ids)


def block_candidates(z: Tensor, k: int, out: Tensor | None = None) -> tuple[Tensor, Candidates]:
    """The block's largest logit [n] and its k best groups of ``_GROUP`` adjacent columns (block-relative ids).
    Blocks that do not split into more than k groups are searched column by column (groups of one). ``out``: a
    float32 [n, k, _GROUP] buffer that receives the groups' logits (and is their ``logits``), or None."""
    n, v = z.shape
    width = _GROUP if v % _GROUP == 0 and v // _GROUP > k else 1
    groups = z.view(n, v // width, width)
    best = groups.amax(dim=-1) if width > 1 else z
    found = _best_groups(groups, best, k, out)
    if out is not None and found.logits.data_ptr() != out.data_ptr():
        found.logits = out.copy_(found.logits)
    return best.amax(dim=-1), found


def _best_groups(groups: Tensor, best: Tensor, k: int, out: Tensor | None = None) -> Candidates:
    """The k best of a block's groups [n, g, w] by their largest logit ``best`` [n, g], then by position. A top-k
    token of the block lies in them: a group outside holds nothing above the k-th group's best, and the k groups
    hold k tokens at least that high. Eagerly, ``torch.topk`` of the maxima decides every row without a tie at the
    k-th place, and only the tied rows are ordered by keys (compiled, the keys are fused and cost nothing)."""
    n, g, width = groups.shape
    position = torch.arange(g, device=groups.device)
    if torch.compiler.is_compiling() or g <= k:
        chosen = torch.topk(_order_keys(best, position.expand_as(best)), min(k, g), dim=-1).indices
    else:
        values, chosen = torch.topk(best, k + 1, dim=-1)
        chosen = chosen[:, :k]
        tied = (values[:, k - 1] == values[:, k]).nonzero().squeeze(1)
        if len(tied):
            chosen[tied] = torch.topk(_order_keys(best[tied], position.expand(len(tied), g)), k, dim=-1).indices
    rows = torch.arange(n, device=groups.device)[:, None] * g  # whole groups copied by row: faster than a gather
    into = out.view(n * k, width) if out is not None and width == _GROUP and g > k else None
    logits = torch.index_select(groups.reshape(n * g, width), 0, (rows + chosen).flatten(), out=into).view(n, -1, width)
    if width < _GROUP:
        logits = F.pad(logits, (0, _GROUP - width), value=-torch.inf)
    found = Candidates(best.gather(1, chosen), chosen * width, torch.full_like(chosen, width), logits)
    return _pad_candidates(found, k) if g < k else found


def _pad_candidates(found: Candidates, k: int) -> Candidates:
    """``found`` with padding groups (no tokens) up to k."""
    missing = k - found.best.shape[1]
    return Candidates(F.pad(found.best, (0, missing), value=-torch.inf), F.pad(found.start, (0, missing)),
                      F.pad(found.width, (0, missing)), F.pad(found.logits, (0, 0, 0, missing), value=-torch.inf))


def merge_candidates(parts: list[Candidates], k: int, held: Tensor) -> Candidates:
    """The k best groups among ``parts`` (whose ``start`` are token ids), by the same order: a top-k token of the
    union lies in one of the k best groups of its own part, hence among these. ``held`` [>= len(parts), n, k,
    _GROUP]: the buffer whose i-th slice is part i's ``logits``; the chosen groups are copied out of it (no
    concatenation of every part's logits)."""
    best, start, width = (torch.cat(x, dim=1) for x in zip(*((p.best, p.start, p.width) for p in parts)))
    keys = torch.where(width > 0, _order_keys(best, start), _NO_KEY)
    chosen = torch.topk(keys, k, dim=-1).indices  # [n, k] in 0 .. len(parts) * k - 1
    n = chosen.shape[0]
    part, slot = chosen.div(k, rounding_mode="floor"), chosen.remainder(k)
    flat = (part * n + torch.arange(n, device=chosen.device)[:, None]) * k + slot  # into held [parts, n, k]
    logits = held.view(-1, _GROUP).index_select(0, flat.flatten()).view(n, k, _GROUP)
    return Candidates(best.gather(1, chosen), start.gather(1, chosen), width.gather(1, chosen), logits)


def top_tokens(found: Candidates, k: int) -> tuple[Tensor, Tensor]:
    """The k largest logits in ``found`` and their token ids [n, k], most probable first, equal logits by the lower
    id (docs/definitions.md §1)."""
    column = torch.arange(_GROUP, device=found.start.device)
    ids = found.start[:, :, None] + column
    keys = torch.where(column < found.width[:, :, None], _order_keys(found.logits, ids), _NO_KEY).flatten(1)
    chosen = torch.topk(keys, k, dim=-1).indices  # sorted: the largest key first
    return found.logits.flatten(1).gather(1, chosen), ids.flatten(1).gather(1, chosen)


def block_predictions(z: Tensor, top_k: int, low: Tensor, above_high: Tensor, target_col: Tensor,
                      scratch: Tensor | None = None, groups_out: Tensor | None = None) -> tuple[Tensor, Candidates, Tensor]:
    """What one vocabulary block adds to a policy's predictions, read before the block is overwritten. z [n, v]: its
    logits (transformed, float32); a logit equals the sampled token's within the rounding when it lies in
    [low, above_high) [n]; target_col [n]: the sampled token's column in this block (outside 0..v-1 when it lies in
    another block); ``scratch``: a float32 buffer of z's shape, or None; ``groups_out``: ``block_candidates``'s
    ``out``. Returns the block's largest logit [n], its ``block_candidates``, and per row how many of its tokens
    outrank the sampled one [n]: a logit of at least ``above_high``, or one of at least ``low`` with a lower id.

    Every column of a block before the sampled token's has a lower id, and none after it: those rows need one count
    against a per-row threshold (``low``, or ``above_high``). The rows whose sampled token lies in the block are
    counted again by the rule as written (``_count_by_the_rule``). Compiled (fast mode's fold), the rule is one
    fused pass over every row."""
    v = z.shape[1]
    block_max, found = block_candidates(z, top_k, groups_out)
    if torch.compiler.is_compiling():
        column = torch.arange(v, device=z.device)
        return block_max, found, ((z >= above_high[:, None])
                                  | ((z >= low[:, None]) & (column < target_col[:, None]))).sum(-1)
    above = _count_at_least(z, torch.where(target_col >= v, low, above_high), scratch)
    own = ((target_col >= 0) & (target_col < v)).nonzero().squeeze(1)
    if len(own):
        above[own] = _count_by_the_rule(z.index_select(0, own), low[own], above_high[own], target_col[own],
                                        None if scratch is None else scratch[: len(own)])
    return block_max, found, above


def _count_by_the_rule(z: Tensor, low: Tensor, above_high: Tensor, target_col: Tensor,
                       scratch: Tensor | None = None) -> Tensor:
    """Per row of z [m, v] (float32), how many tokens outrank the sampled one in column ``target_col`` [m]: at least
    ``above_high`` [m], or at least ``low`` [m] in a column before it. [m] int64. The per-column threshold is built
    in float32 (a float 1.0 before the sampled column, then ``torch.lerp``, exact at 0 and 1): about 2x faster in
    eager PyTorch than the rule's bool masks."""
    column = torch.arange(z.shape[1], dtype=torch.float32, device=z.device)
    scratch = torch.empty_like(z) if scratch is None else scratch
    before = torch.lt(column, target_col[:, None].float(), out=scratch)  # exact: column ids < 2**24
    threshold = torch.lerp(above_high[:, None], low[:, None], before, out=before)
    return torch.ge(z, threshold, out=threshold).sum(dim=-1).long()


def _count_at_least(z: Tensor, threshold: Tensor, scratch: Tensor | None = None) -> Tensor:
    """Per row, how many of z [n, v] (float32) are at least ``threshold`` [n] [n] int64. The comparison writes 1.0
    or 0.0 into ``scratch`` (float32, z's shape), whose float sum is exact (v < 2**24). On a [512, 4096] block in eager
    PyTorch this is about 1.5x faster than the sign bit of z - t (sub, shift, sum) and 3x faster than summing a bool
    mask, which is what it returns without ``scratch``."""
    at_least = torch.ge(z, threshold[:, None], out=scratch)
    return at_least.sum(dim=-1).long()


def fold_block(z: Tensor, running_max: Tensor, bias: Tensor | None = None, scale: float | Tensor = 1.0,
               exp_out: Tensor | None = None, softcap: float | None = None, top_k: int = 0,
               low: Tensor | None = None, above_high: Tensor | None = None, target_col: Tensor | None = None,
               groups_out: Tensor | None = None):
    """One vocabulary block of the streamed entropy. z [n, v] matmul output (any float dtype), logits = (z + bias)
    * scale, or softcap * tanh((z + bias) / softcap) * scale (scale: a float, or a 0-d float32 tensor); running_max [n]
    float32. Returns the new max m [n] and, relative to it, S = sum_j e_j and T = sum_j e_j (l_j - m) with
    e_j = exp(max(l_j - m, -87)), all float32; and with ``top_k``, what the block adds to the predictions (else None):
    its ``block_candidates`` for the top-k (their logits written into ``groups_out`` when given), and per row how many
    of its tokens outrank the sampled one (``block_predictions``).

    Exact mode calls it eagerly on a float32 z, which it overwrites, with ``exp_out`` a reused float32 buffer of z's
    shape: no large tensor is allocated per block. Fast mode runs it compiled on a bf16 z (torch.compile fuses it
    into two passes over the block, and z is left alone), with the scale a tensor: one compiled fold serves every
    temperature (each ``top_k`` is compiled once).
    """
    z = z.float()
    if bias is not None:
        z += bias
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    if isinstance(scale, Tensor) or scale != 1.0:
        z *= scale
    picked = None
    if top_k:  # before the block is overwritten; the groups' maxima give the block's maximum too
        block_max, found, above = block_predictions(z, top_k, low, above_high, target_col, exp_out, groups_out)
        picked = found, above
    else:
        block_max = z.amax(dim=-1)
    new_max = torch.maximum(running_max, block_max)
    z -= new_max[:, None]
    # exp(t) for t < -87 underflows float32 and takes a slow path (6-12x); such a term adds < 1e-36 nats
    z.clamp_(min=_EXP_FLOOR)
    e = torch.exp(z, out=exp_out)
    return new_max, e.sum(dim=-1), torch.mul(e, z, out=exp_out).sum(dim=-1), picked


_COMPILED: dict = {}  # "fold_block": fast mode's fold, compiled once per process (or eager, where it cannot be)


def _fast_fold_block():
    """``fold_block`` compiled: fast mode's bf16 blocks, with their float32 reductions fused. Inductor caches the kernel
    on disk across processes. Where compiling is impossible (no C++ compiler, an unsupported platform) the eager
    function, with one warning."""
    if "fold_block" not in _COMPILED:
        try:
            compiled = torch.compile(fold_block, dynamic=True)
            probe = torch.zeros(2, 8, dtype=torch.bfloat16)
            compiled(probe, torch.full((2,), -torch.inf))
            compiled(probe, torch.full((2,), -torch.inf), top_k=2, low=torch.zeros(2), above_high=torch.zeros(2),
                     target_col=torch.zeros(2, dtype=torch.long))
            _COMPILED["fold_block"] = compiled
        except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
            warnings.warn(f"ipolicy runs fast mode's fold without torch.compile ({type(error).__name__}: {error}); "
                          "it stays correct but is slower. Install a C++ compiler (gcc) to compile it.", stacklevel=3)
            _COMPILED["fold_block"] = fold_block
    return _COMPILED["fold_block"]


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy in nats of softmax(logits) along the last axis, as log S - sum_j p_j z_j with z = logits - max
    (one logsumexp, no log of probabilities). [..., vocab] -> [...] float32."""
    z = logits.float()
    z = z - z.amax(dim=-1, keepdim=True)
    log_sum = torch.logsumexp(z, dim=-1)
    return log_sum - (torch.softmax(z, dim=-1) * z).sum(-1)


@dataclass
class Predictions:
    """What a policy predicts at N states (docs/definitions.md §1, "What a policy predicts").

    ``entropy`` [N] float32, nats; ``top_ids`` [N, K] int64 and ``top_probs`` [N, K] float32: the K most probable
    tokens, most probable first (equal probabilities: the lower token id first); ``token_prob`` [N] float32: the
    probability of the token each state's position actually continues with; ``token_rank`` [N] int64: its rank, 1 +
    the number of tokens more probable than it (an equally probable token with a lower id counts as more probable).
    A state that holds NaN or inf has no policy: its entropy, probabilities and ``token_prob`` are NaN, its
    ``top_ids`` -1 and its ``token_rank`` 0."""

    entropy: Tensor
    top_ids: Tensor
    top_probs: Tensor
    token_prob: Tensor
    token_rank: Tensor


@dataclass
class PolicyHead:
    """Reads residual states as policies with the model's own unembedding.

    Args:
        unembed: the model's lm_head (``nn.Linear``; its bias, if any, is used).
        final_norm: the model's final norm LNf, applied to every state when ``norm_mode == "final"``.
        norm_mode: ``"none"`` (the paper's: pi(x) = softmax(U x)) or ``"final"`` (logit lens: softmax(U LNf(x))).
        temperature: the policy is softmax(logits / temperature).
        logit_softcap: part of the model's own logit transform g, applied to every state's logits before the
            temperature: softcap * tanh(z / softcap) (Gemma-2's final_logit_softcapping), or None.
        logit_scale: the other part of g, a factor (Cohere's logit_scale, 1 / Granite's logits_scaling).
        fast: compute the unembedding matmul in bfloat16 (entropies and predictions; about 2x faster on CPUs with
            bf16 units; logits within one bf16 step count as ties for the rank, docs/definitions.md §1).
        token_chunk: rows of states per block of the streamed entropy.
        vocab_block: rows of U per block of the streamed entropy.
    """

    unembed: nn.Module
    final_norm: nn.Module | None = None
    norm_mode: NormMode = "none"
    temperature: float = 1.0
    logit_softcap: float | None = None
    logit_scale: float = 1.0
    fast: bool = False
    token_chunk: int = 512
    vocab_block: int = 4096
    _weight_cache: dict = field(default_factory=dict, repr=False)
    _scratch_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.norm_mode not in NORM_MODES:
            raise ValueError(f"norm_mode must be one of {NORM_MODES}, got {self.norm_mode!r}")
        if self.norm_mode == "final" and self.final_norm is None:
            raise ValueError("norm_mode='final' needs the model's final norm")
        if not (is_number(self.temperature) and 0 < self.temperature < math.inf):
            raise ValueError(f"temperature must be a finite number above 0, got {self.temperature!r}")
        if not (is_number(self.logit_scale) and self.logit_scale != 0 and math.isfinite(self.logit_scale)):
            raise ValueError(f"logit_scale must be a finite number other than 0, got {self.logit_scale!r}")
        softcap = self.logit_softcap
        if softcap is not None and not (is_number(softcap) and 0 < softcap < math.inf):
            raise ValueError(f"logit_softcap must be None (no soft-capping) or a finite number above 0, got "
                             f"{self.logit_softcap!r}")
        for name in ("token_chunk", "vocab_block"):
            value = getattr(self, name)
            if not (is_whole(value) and value >= 1):
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")

    @property
    def vocab_size(self) -> int:
        return self.unembed.weight.shape[0]

    def prepare(self, states: Tensor) -> Tensor:
        """The vector the policy reads: ``states`` itself, or LNf(states) in ``final`` mode. Shape kept."""
        if self.norm_mode == "final":
            return self.final_norm(states)
        return states

    @property
    def transform_description(self) -> str:
        """The logit transform g in words, for manifests: 'identity', 'softcap(30.0)', 'scale(0.0625)'."""
        parts = [f"softcap({self.logit_softcap})"] if self.logit_softcap else []
        parts += [f"scale({self.logit_scale})"] if self.logit_scale != 1.0 else []
        return " then ".join(parts) or "identity"

    def logits(self, states: Tensor) -> Tensor:
        """Policy logits g(U x) / temperature, differentiable. states [..., d] -> [..., vocab]."""
        z = self.unembed(self.prepare(states))
        if self.logit_softcap:
            z = self.logit_softcap * torch.tanh(z / self.logit_softcap)
        return z * (self.logit_scale / self.temperature)

    def log_probs(self, states: Tensor, targets: Tensor) -> Tensor:
        """log pi(x)(target), differentiable. states [N, d], targets [N] (token ids) -> [N] float32."""
        logits = self.logits(states).float()
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    def log_probs_and_entropy(self, states: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Differentiable log pi(x)(target) and H(pi(x)) from one set of logits. [N, d], [N] -> ([N], [N])."""
        logp = torch.log_softmax(self.logits(states).float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy

    @torch.no_grad()
    def entropy(self, states: Tensor) -> Tensor:
        """Entropy in nats of pi(x) for each row. states [N, d] (any float dtype) -> [N] float32 on the CPU."""
        weight, bias = self._matmul_weights()
        states = self.prepare(states).to(device=weight.device)
        out = [self._entropy_chunk(chunk.to(weight.dtype), weight, bias)[0] for chunk in states.split(self.token_chunk)]
        return torch.cat(out).cpu() if out else torch.empty(0)

    @torch.no_grad()
    def predictions(self, states: Tensor, targets: Tensor, top_k: int) -> Predictions:
        """The entropy of pi(x) for each row, its ``top_k`` most probable tokens, and the probability and rank of the
        row's ``target`` token, from one pass over the vocabulary blocks (no [N x vocab] tensor, no second matmul).
        states [N, d], targets [N] token ids -> ``Predictions`` on the CPU, with min(``top_k``, vocabulary) columns."""
        if not (is_whole(top_k) and top_k >= 1):
            raise ValueError(f"top_k must be a whole number of at least 1, got {top_k!r}")
        top_k = int(top_k)
        if targets.shape != states.shape[:1]:
            raise ValueError(f"targets must hold one token id per state: shape {tuple(states.shape[:1])}, got "
                             f"{tuple(targets.shape)}")
        if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
            raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
        if len(targets) and not (0 <= int(targets.min()) and int(targets.max()) < self.vocab_size):
            raise ValueError(f"targets must be token ids in 0..{self.vocab_size - 1}, got {int(targets.min())}.."
                             f"{int(targets.max())}")
        weight, bias = self._matmul_weights()
        states = self.prepare(states).to(device=weight.device)
        targets = targets.to(device=weight.device, dtype=torch.long)
        k = min(top_k, weight.shape[0])
        if len(states) == 0:
            empty = torch.empty(0)
            return Predictions(empty, torch.empty(0, k, dtype=torch.long), torch.empty(0, k), empty,
                               torch.empty(0, dtype=torch.long))
        parts = [self._entropy_chunk(chunk.to(weight.dtype), weight, bias, k, target)
                 for chunk, target in zip(states.split(self.token_chunk), targets.split(self.token_chunk))]
        entropy, log_z, top_logits, top_ids, target_logit, rank = (torch.cat(x) for x in zip(*parts))
        found = Predictions(entropy, top_ids, torch.exp(top_logits - log_z[:, None]), torch.exp(target_logit - log_z),
                            rank)
        undefined = ~torch.isfinite(entropy)  # a NaN or inf in the state (or logits past float32): no policy to read
        if undefined.any():
            found.top_ids[undefined], found.top_probs[undefined], found.token_prob[undefined] = -1, torch.nan, torch.nan
            found.token_rank[undefined] = 0
        return Predictions(*(value.cpu() for value in vars(found).values()))

    def _target_logits(self, x: Tensor, weight: Tensor, bias: Tensor | None,
                       targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The logit of each row's target token, transformed as the blocks' are [n] float32, and the interval
        [low, high] [n] within which a block's logit counts as equal to it. The dot product sums in another order than
        the matmul's: they agree to about sqrt(d) float32 roundings of |x| |u_t|; in fast mode both are then rounded to
        bf16, one bf16 step apart at most. That interval of the raw logit is carried through the transform (soft-capping
        shrinks it with the logit), and the transform's own roundings are added."""
        eps = torch.finfo(torch.float32).eps
        rows = weight[targets].float()
        raw = (x.float() * rows).sum(-1)
        norms = x.double().norm(dim=-1) * rows.double().norm(dim=-1)  # float64: no overflow or underflow of |x|
        tolerance = (4 * x.shape[1] ** 0.5 * eps * norms).float()
        if x.dtype != torch.float32:
            raw = raw.to(x.dtype).float()
            tolerance = tolerance + raw.abs() * 2.0 ** -7
        z = raw if bias is None else raw + bias[targets]
        tolerance = tolerance + eps * z.abs()  # adding the bias rounds once more, in the block as here
        target = self._transform(z)
        ends = torch.stack([self._transform(z - tolerance), self._transform(z + tolerance)])
        rounding = 4 * eps * ends.abs().amax(dim=0)  # the transform's roundings (a negative logit scale reverses it)
        return target, ends.amin(dim=0) - rounding, ends.amax(dim=0) + rounding

    def _matmul_weights(self) -> tuple[Tensor, Tensor | None]:
        """U's weight and bias in the matmul dtype (float32, or bfloat16 when fast), cached until U changes."""
        weight = self.unembed.weight
        bias = getattr(self.unembed, "bias", None)
        dtype = torch.bfloat16 if self.fast else torch.float32
        key = (weight.data_ptr(), weight._version, dtype)
        if self._weight_cache.get("key") != key:
            self._weight_cache.clear()
            self._weight_cache.update(
                key=key,
                weight=weight.detach().to(dtype),
                bias=None if bias is None else bias.detach().float(),
            )
        return self._weight_cache["weight"], self._weight_cache["bias"]

    def _scratch(self, name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A reused contiguous [rows, cols] buffer: the kernel allocates nothing large per block, which keeps the
        allocator from fragmenting the heap during long forwards."""
        key = (name, dtype, device)
        buffer = self._scratch_cache.get(key)
        if buffer is None or buffer.numel() < rows * cols:
            size = max(rows * cols, self.token_chunk * self.vocab_block)
            buffer = self._scratch_cache[key] = torch.empty(size, dtype=dtype, device=device)
        return buffer[: rows * cols].view(rows, cols)

    def _entropy_chunk(self, x: Tensor, weight: Tensor, bias: Tensor | None, top_k: int = 0,
                       targets: Tensor | None = None) -> tuple[Tensor, ...]:
        """One chunk of rows through every vocabulary block. Returns (entropy [n],); with ``top_k`` and ``targets``
        also log Z [n], the top-k logits [n, k] and ids [n, k], the targets' logits [n] and ranks [n]."""
        n = x.shape[0]
        running_max = torch.full((n,), -torch.inf, device=x.device)
        sum_exp = torch.zeros(n, device=x.device)  # S = sum_j exp(z_j - running_max)
        sum_exp_z = torch.zeros(n, device=x.device)  # T = sum_j exp(z_j - running_max) * (z_j - running_max)
        scale = self.logit_scale / self.temperature
        fold = _fast_fold_block() if self.fast else fold_block  # fast: bf16 matmul, compiled float32 reductions
        if self.fast:  # a tensor is an input of the compiled fold; a float would be compiled in, once per temperature
            scale = torch.tensor(scale, dtype=torch.float32, device=x.device)
        if top_k:
            target_logit, low, high = self._target_logits(x, weight, bias, targets)
            above_high = torch.nextafter(high, torch.full_like(high, torch.inf))  # z > high  <=>  z >= above_high
            candidates: list[Candidates] = []
            # every block's chosen groups go into one buffer, merged from there: no concatenation of their logits
            parts = min(_MERGE_EVERY, -(-weight.shape[0] // self.vocab_block))
            held = self._scratch("groups", parts * n * top_k, _GROUP, torch.float32, x.device).view(
                parts, n, top_k, _GROUP)
            outranked = torch.zeros(n, dtype=torch.long, device=x.device)
        for start in range(0, weight.shape[0], self.vocab_block):
            block = weight[start : start + self.vocab_block]
            z = self._scratch("z", n, block.shape[0], x.dtype, x.device)
            torch.matmul(x, block.T, out=z)
            block_bias = None if bias is None else bias[start : start + self.vocab_block]
            exp_out = None if self.fast else self._scratch("e", n, block.shape[0], torch.float32, x.device)
            new_max, block_sum, block_sum_z, picked = fold(
                z, running_max, block_bias, scale, exp_out, self.logit_softcap,
                **(dict(top_k=top_k, low=low, above_high=above_high, target_col=targets - start,
                        **({} if self.fast else dict(groups_out=held[len(candidates)])))
                   if top_k else {}))
            if top_k:
                found, above = picked
                if self.fast:  # the compiled fold returns its groups' logits; held keeps them for the merge
                    found.logits = held[len(candidates)].copy_(found.logits)
                found.start += start
                candidates.append(found)
                if len(candidates) == parts and start + self.vocab_block < weight.shape[0]:  # more blocks to come
                    merged = merge_candidates(candidates, top_k, held)
                    merged.logits = held[0].copy_(merged.logits)
                    candidates = [merged]
                outranked += above
            # Re-express the running sums relative to the new max: e_old' = e_old * c and z' = z - shift.
            shift = new_max - running_max  # >= 0; inf on the first block, where the sums are still zero
            c = torch.exp(-shift)
            sum_exp_z = (sum_exp_z - sum_exp * torch.where(sum_exp > 0, shift, 0.0)) * c + block_sum_z
            sum_exp = sum_exp * c + block_sum
            running_max = new_max
        entropy = torch.log(sum_exp) - sum_exp_z / sum_exp
        if not top_k:
            return (entropy,)
        top_logits, top_ids = top_tokens(merge_candidates(candidates, top_k, held), top_k)
        return entropy, running_max + torch.log(sum_exp), top_logits, top_ids, target_logit, outranked + 1

    def _transform(self, z: Tensor) -> Tensor:
        """The logit transform g and the temperature on logits that already hold the bias (float32)."""
        if self.logit_softcap:
            z = self.logit_softcap * torch.tanh(z / self.logit_softcap)
        return z * (self.logit_scale / self.temperature)
