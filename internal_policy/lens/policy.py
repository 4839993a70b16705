"""From a residual state to a samplable policy: pi(x) = softmax(g(U x) / temperature) (docs/definitions.md §1), g
being the model's own logit transform (identity; Gemma-2's soft-capping; a logit scale).

``PolicyHead`` is the one place in the project that turns a state into a policy. The entropy engine calls
``entropy``; the trainer calls ``log_probs`` (BuPO's internal policy) — both go through the same unembedding.

Entropies are computed without materialising [tokens x vocab] probabilities: logits are produced in blocks of
``token_chunk`` rows x ``vocab_block`` columns (small enough to stay in cache) and folded into an online
(max, sum exp, sum exp * logit) triple, so H = log S - T / S in one pass over each logit block.
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


def fold_block(z: Tensor, running_max: Tensor, bias: Tensor | None = None, scale: float = 1.0,
               exp_out: Tensor | None = None, softcap: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One vocabulary block of the streamed entropy. z [n, v] matmul output (any float dtype), logits = (z + bias)
    * scale, or softcap * tanh((z + bias) / softcap) * scale; running_max [n] float32. Returns the new max m [n] and, relative to it, S = sum_j e_j and
    T = sum_j e_j (l_j - m) with e_j = exp(max(l_j - m, -87)), all float32.

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
    new_max = torch.maximum(running_max, z.amax(dim=-1))
    z -= new_max[:, None]
    # exp(t) for t < -87 underflows float32 and takes a slow path (6-12x); such a term adds < 1e-36 nats
    z.clamp_(min=_EXP_FLOOR)
    e = torch.exp(z, out=exp_out)
    return new_max, e.sum(dim=-1), torch.mul(e, z, out=exp_out).sum(dim=-1)


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
class PolicyHead:
    """Reads residual states as policies with the model's own unembedding.

    Args:
        unembed: the model's lm_head (``nn.Linear``; its bias, if any, is used).
        final_norm: the model's final norm LNf, applied to every state when ``norm_mode == "final"``.
        norm_mode: ``"none"`` (the paper's: pi(x) = softmax(U x)) or ``"final"`` (logit lens: softmax(U LNf(x))).
        temperature: the policy is softmax(logits / temperature).
        logit_softcap, logit_scale: the model's own logit transform g, applied to every state's logits before the
            temperature: softcap * tanh(z / softcap) (Gemma-2's final_logit_softcapping) and a factor (Cohere's
            logit_scale, 1 / Granite's logits_scaling).
        fast: compute the unembedding matmul in bfloat16 (entropy only; about 4x faster on CPUs with bf16 units).
        token_chunk, vocab_block: block sizes of the streamed entropy (rows of states, rows of U).
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
        out = [self._entropy_chunk(chunk.to(weight.dtype), weight, bias) for chunk in states.split(self.token_chunk)]
        return torch.cat(out).cpu() if out else torch.empty(0)

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

    def _entropy_chunk(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        n = x.shape[0]
        running_max = torch.full((n,), -torch.inf, device=x.device)
        sum_exp = torch.zeros(n, device=x.device)  # S = sum_j exp(z_j - running_max)
        sum_exp_z = torch.zeros(n, device=x.device)  # T = sum_j exp(z_j - running_max) * (z_j - running_max)
        scale = self.logit_scale / self.temperature
        fold = _fast_fold_block() if self.fast else fold_block  # fast: bf16 matmul, compiled float32 reductions
        for start in range(0, weight.shape[0], self.vocab_block):
            block = weight[start : start + self.vocab_block]
            z = self._scratch("z", n, block.shape[0], x.dtype, x.device)
            torch.matmul(x, block.T, out=z)
            block_bias = None if bias is None else bias[start : start + self.vocab_block]
            exp_out = None if self.fast else self._scratch("e", n, block.shape[0], torch.float32, x.device)
            new_max, block_sum, block_sum_z = fold(z, running_max, block_bias, scale, exp_out, self.logit_softcap)
            # Re-express the running sums relative to the new max: e_old' = e_old * c and z' = z - shift.
            shift = new_max - running_max  # >= 0; inf on the first block, where the sums are still zero
            c = torch.exp(-shift)
            sum_exp_z = (sum_exp_z - sum_exp * torch.where(sum_exp > 0, shift, 0.0)) * c + block_sum_z
            sum_exp = sum_exp * c + block_sum
            running_max = new_max
        return torch.log(sum_exp) - sum_exp_z / sum_exp
