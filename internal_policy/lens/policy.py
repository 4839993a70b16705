"""From a residual state to a samplable policy: pi(x) = softmax(g(U x) / temperature) (docs/definitions.md §1), g
being the model's own logit transform (identity; Gemma-2's soft-capping; a logit scale).

``PolicyHead`` is the one place in the project that turns a state into a policy. The entropy engine calls
``entropy`` (or ``predictions``, which adds what the policy predicts); the trainer calls ``log_probs`` (BuPO's
internal policy) — all go through the same unembedding.

Entropies are computed without materialising [tokens x vocab] probabilities: logits are produced in blocks of
``token_chunk`` rows x ``vocab_block`` columns (small enough to stay in cache) and folded into an online
(max, sum exp, sum exp * logit) triple, so H = log S - T / S in one pass over each logit block. ``predictions`` reads
the same blocks once more before they are folded: a running top-k, merged block by block, and a running count of the
logits that outrank the sampled token's (docs/definitions.md §1, "What a policy predicts").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ..config import NORM_MODES

NormMode = Literal["none", "final"]
_EXP_FLOOR = -87.0


_GROUP = 64  # the columns of a block's top-k search are read in groups this wide


def select_block(z: Tensor, top_k: int, target_logit: Tensor, target_col: Tensor,
                 tolerance: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What one vocabulary block contributes to a policy's predictions. z [n, v]: the block's logits (transformed,
    float32); target_logit [n]: the sampled token's logit, and ``tolerance`` [n] the rounding within which a logit
    counts as equal to it; target_col [n]: its column in this block (outside 0..v-1 when it lies in another block).
    Returns the ``top_k + 1`` largest logits and their columns [n, top_k + 1] (the extra one shows a tie at the
    boundary) and, per row, how many of the block's tokens outrank the sampled one: a larger logit, or an equal one
    with a lower id [n]."""
    values, columns = _block_top(z, min(top_k + 1, z.shape[1]))
    return values, columns, _outranking(z, target_logit, target_col, tolerance)


def _block_top(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.topk(z, k)`` [n, k], found among the k groups of columns with the largest maxima: each of the k
    largest logits lies in a group whose maximum is at least the k-th largest, so those groups hold them all (with
    equal logits at the k-th place, some of them; ``_exact_ties`` redoes such rows). The block's columns are then read
    once, for the groups' maxima, and only k groups are searched."""
    n, v = z.shape
    if v % _GROUP or v // _GROUP <= k:
        return torch.topk(z, k, dim=-1)
    groups = z.view(n, v // _GROUP, _GROUP)
    best = torch.topk(groups.amax(dim=-1), k, dim=-1).indices  # [n, k]
    candidates = groups.gather(1, best[:, :, None].expand(n, k, _GROUP)).reshape(n, k * _GROUP)
    values, at = torch.topk(candidates, k, dim=-1)
    return values, best.gather(1, at // _GROUP) * _GROUP + at % _GROUP


def _outranking(z: Tensor, target_logit: Tensor, target_col: Tensor, tolerance: Tensor) -> Tensor:
    """Per row, how many of the block's logits outrank the sampled one [n]: larger beyond the rounding, or equal
    within it with a lower id. Every column of a block before the sampled token's has a lower id, and none after it,
    so one comparison with a per-row threshold counts those rows; only the rows whose sampled token lies in this
    block need both tests (compiled, the two tests are one fused pass anyway)."""
    v = z.shape[1]
    high, low = target_logit + tolerance, target_logit - tolerance

    def both_tests(rows):  # the rule as written, on the given rows
        column = torch.arange(v, device=z.device)
        return ((z[rows] > high[rows, None]) | ((z[rows] >= low[rows, None]) & (column < target_col[rows, None]))).sum(-1)

    if torch.compiler.is_compiling():
        return both_tests(slice(None))
    above_high = torch.nextafter(high, torch.full_like(high, torch.inf))  # z > high  <=>  z >= above_high
    threshold = torch.where(target_col >= v, low, above_high)
    above = torch.ge(z, threshold[:, None]).view(torch.uint8).sum(-1, dtype=torch.int32).long()
    own = ((target_col >= 0) & (target_col < v)).nonzero().squeeze(1)
    if len(own):
        above[own] = both_tests(own)
    return above


def fold_block(z: Tensor, running_max: Tensor, bias: Tensor | None = None, scale: float = 1.0,
               exp_out: Tensor | None = None, softcap: float | None = None, top_k: int = 0,
               target_logit: Tensor | None = None, target_col: Tensor | None = None, tolerance: Tensor | None = None):
    """One vocabulary block of the streamed entropy. z [n, v] matmul output (any float dtype), logits = (z + bias)
    * scale, or softcap * tanh((z + bias) / softcap) * scale; running_max [n] float32. Returns the new max m [n] and,
    relative to it, S = sum_j e_j and T = sum_j e_j (l_j - m) with e_j = exp(max(l_j - m, -87)), all float32; and with
    ``top_k``, ``select_block`` of the logits (else None).

    Exact mode calls it eagerly on a float32 z, which it overwrites, with ``exp_out`` a reused float32 buffer of z's
    shape: no large tensor is allocated per block. Fast mode runs it compiled on a bf16 z (torch.compile fuses it
    into two passes over the block, and z is left alone).
    """
    z = z.float()
    if bias is not None:
        z += bias
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    if scale != 1.0:
        z *= scale
    picked = select_block(z, top_k, target_logit, target_col, tolerance) if top_k else None
    new_max = torch.maximum(running_max, z.amax(dim=-1))
    z -= new_max[:, None]
    # exp(t) for t < -87 underflows float32 and takes a slow path (6-12x); such a term adds < 1e-36 nats
    z.clamp_(min=_EXP_FLOOR)
    e = torch.exp(z, out=exp_out)
    return new_max, e.sum(dim=-1), torch.mul(e, z, out=exp_out).sum(dim=-1), picked


_compiled_fold_block = None


def _fast_fold_block():
    """``fold_block`` compiled once per process (inductor caches the kernel on disk across processes), or the eager
    function where compiling is impossible (no C++ compiler, an unsupported platform), with one warning."""
    global _compiled_fold_block
    if _compiled_fold_block is None:
        try:
            compiled = torch.compile(fold_block, dynamic=True)
            probe = torch.zeros(2, 8, dtype=torch.bfloat16)
            compiled(probe, torch.full((2,), -torch.inf))
            compiled(probe, torch.full((2,), -torch.inf), top_k=2, target_logit=torch.zeros(2),
                     target_col=torch.zeros(2, dtype=torch.long), tolerance=torch.zeros(2))
            _compiled_fold_block = compiled
        except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
            warnings.warn(f"Fast mode runs without torch.compile ({type(error).__name__}: {error}); it stays correct but "
                          "is slower. Install a C++ compiler (gcc) to compile it.", stacklevel=2)
            _compiled_fold_block = fold_block
    return _compiled_fold_block


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
    the number of tokens more probable than it (an equally probable token with a lower id counts as more probable)."""

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
        fast: compute the unembedding matmul in bfloat16 (entropy only; about 4x faster on CPUs with bf16 units).
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
        states [N, d], targets [N] token ids -> ``Predictions`` on the CPU."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        weight, bias = self._matmul_weights()
        states = self.prepare(states).to(device=weight.device)
        targets = targets.to(device=weight.device, dtype=torch.long)
        parts = [self._entropy_chunk(chunk.to(weight.dtype), weight, bias, min(top_k, weight.shape[0]), target)
                 for chunk, target in zip(states.split(self.token_chunk), targets.split(self.token_chunk))]
        if not parts:
            empty = torch.empty(0)
            return Predictions(empty, torch.empty(0, top_k, dtype=torch.long), torch.empty(0, top_k), empty,
                               torch.empty(0, dtype=torch.long))
        entropy, log_z, top_logits, top_ids, target_logit, rank = (torch.cat(x) for x in zip(*parts))
        return Predictions(entropy.cpu(), top_ids.cpu(), torch.exp(top_logits - log_z[:, None]).cpu(),
                           torch.exp(target_logit - log_z).cpu(), rank.cpu())

    def _target_logits(self, x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The logit of each row's target token, transformed as the blocks' are [n] float32, and the rounding within
        which a block's logit counts as equal to it [n]. The dot product sums in another order than the matmul's: they
        agree to about sqrt(d) float32 roundings of |x| |u_t|; in fast mode both are then rounded to bf16, one
        bf16 step apart at most."""
        rows = weight[targets].float()
        raw = (x.float() * rows).sum(-1)
        tolerance = 4 * x.shape[1] ** 0.5 * torch.finfo(torch.float32).eps * x.float().norm(dim=-1) * rows.norm(dim=-1)
        if x.dtype != torch.float32:
            raw = raw.to(x.dtype).float()
            tolerance = tolerance + raw.abs() * 2.0 ** -7
        z = raw if bias is None else raw + bias[targets]
        return self._transform(z), tolerance * abs(self.logit_scale / self.temperature)

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
            buffer = self._scratch_cache[key] = torch.empty(self.token_chunk * self.vocab_block, dtype=dtype, device=device)
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
        if top_k:
            target_logit, tolerance = self._target_logits(x, weight, bias, targets)
            best = torch.empty(n, 0, device=x.device), torch.empty(n, 0, dtype=torch.long, device=x.device)
            outranked = torch.zeros(n, dtype=torch.long, device=x.device)
        for start in range(0, weight.shape[0], self.vocab_block):
            block = weight[start : start + self.vocab_block]
            z = self._scratch("z", n, block.shape[0], x.dtype, x.device)
            torch.matmul(x, block.T, out=z)
            block_bias = None if bias is None else bias[start : start + self.vocab_block]
            exp_out = None if self.fast else self._scratch("e", n, block.shape[0], torch.float32, x.device)
            new_max, block_sum, block_sum_z, picked = fold(
                z, running_max, block_bias, scale, exp_out, self.logit_softcap,
                **(dict(top_k=top_k, target_logit=target_logit, target_col=targets - start, tolerance=tolerance)
                   if top_k else {}))
            if top_k:
                values, ids, above = picked
                best = _merge_top(best, self._exact_ties(x, z, block, block_bias, start, top_k, values, ids), top_k)
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
        return entropy, running_max + torch.log(sum_exp), best[0], best[1], target_logit, outranked + 1

    def _transform(self, z: Tensor) -> Tensor:
        """The logit transform g and the temperature on logits that already hold the bias (float32)."""
        if self.logit_softcap:
            z = self.logit_softcap * torch.tanh(z / self.logit_softcap)
        return z * (self.logit_scale / self.temperature)

    def _exact_ties(self, x, z, block, block_bias, start, top_k, values, columns):
        """A block's top-k (logits [n, k], token ids [n, k], most probable first, equal logits: the lower id first).
        ``torch.topk`` keeps an arbitrary one of logits tied at the k-th place; the rows where that happens (identical
        rows of U, such as a vocabulary's unused tokens; often in fast mode, whose bf16 logits round many together)
        are selected again from their logits, all at once: the logits above the k-th, then the tied ones by id."""
        if values.shape[1] > top_k:
            tied = (values[:, top_k - 1] == values[:, top_k]).nonzero().squeeze(1)
            values, columns = values[:, :top_k].clone(), columns[:, :top_k].clone()
            if len(tied):
                # fast mode's fold leaves its bf16 z as it was; exact mode's overwrote it, so those rows are redone
                raw = z[tied].float() if self.fast else torch.matmul(x[tied], block.T).float()
                logits = self._transform(raw + (0 if block_bias is None else block_bias))
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                greater, equal = logits > kth, logits == kth
                room = top_k - greater.sum(-1, keepdim=True)
                chosen = greater | (equal & (equal.cumsum(-1) <= room))  # exactly top_k a row, in id order
                picked = chosen.nonzero()[:, 1].view(len(tied), top_k)
                values[tied], columns[tied] = logits.gather(1, picked), picked
        return _sorted_top(values, columns + start)


def _sorted_top(values: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Candidates [n, m] in order: logit descending, the lower token id first among equal logits."""
    by_id = torch.argsort(ids, dim=-1, stable=True)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    by_value = torch.argsort(values, dim=-1, descending=True, stable=True)
    return values.gather(1, by_value), ids.gather(1, by_value)


def _merge_top(best: tuple[Tensor, Tensor], block: tuple[Tensor, Tensor], k: int) -> tuple[Tensor, Tensor]:
    """The running top-k merged with a later block's (whose ids are all higher): the k best, ties to the lower id."""
    values, ids = torch.cat([best[0], block[0]], dim=1), torch.cat([best[1], block[1]], dim=1)
    order = torch.argsort(values, dim=-1, descending=True, stable=True)[:, :k]
    return values.gather(1, order), ids.gather(1, order)
