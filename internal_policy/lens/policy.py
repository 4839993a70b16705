"""From a residual state to a samplable policy: pi(x) = softmax(g(U x) / temperature) (docs/definitions.md §1), g
being the model's own logit transform (identity; Gemma-2's soft-capping; a logit scale).

``PolicyHead`` is the one place in the project that turns a state into a policy. The entropy engine calls
``entropy``; the trainer calls ``log_probs`` (BuPO's internal policy) — both go through the same unembedding.

Entropies are computed without materialising [tokens x vocab] probabilities: logits are produced in blocks of
``token_chunk`` rows x ``vocab_block`` columns (small enough to stay in cache) and folded into an online
(max, sum exp, sum exp * logit) triple, so H = log S - T / S in one pass over each logit block. The fold is
compiled (torch.compile, a few seconds once per process) in both modes; exact mode's matmuls and reductions are
float32 throughout.
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
    * scale, or softcap * tanh((z + bias) / softcap) * scale; running_max [n] float32. Returns the new max m [n] and,
    relative to it, S = sum_j e_j and T = sum_j e_j (l_j - m) with e_j = exp(max(l_j - m, -87)), all float32.

    This is the eager form, for where torch.compile is unavailable: it overwrites a float32 z, and with
    ``exp_out`` (a reused float32 buffer of z's shape) it allocates nothing of z's size.
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


def _fold_expression(z: Tensor, running_max: Tensor, bias: Tensor | None, scale: float,
                     softcap: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """``fold_block`` written out of place, for torch.compile: it fuses the whole block into two passes over z
    (max, then the exponential sums), in float32 whatever z's dtype, and neither writes z nor allocates its size."""
    z = z.float()
    if bias is not None:
        z = z + bias
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    if scale != 1.0:
        z = z * scale
    new_max = torch.maximum(running_max, z.amax(dim=-1))
    z = (z - new_max[:, None]).clamp(min=_EXP_FLOOR)
    e = torch.exp(z)
    return new_max, e.sum(dim=-1), (e * z).sum(dim=-1)


_compiled_fold_block = None
_compiled_dtypes: set[torch.dtype] = set()


def _compiled_fold(dtype: torch.dtype):
    """``_fold_expression`` compiled for blocks of ``dtype`` (compiled once per process and dtype, on first use;
    inductor caches the kernels on disk across processes), or None where compiling is impossible (no C++ compiler,
    an unsupported platform): then the eager ``fold_block`` runs, with one warning."""
    global _compiled_fold_block
    if _compiled_fold_block is None:
        _compiled_fold_block = torch.compile(_fold_expression, dynamic=True)
    if _compiled_fold_block is not fold_block and dtype not in _compiled_dtypes:
        try:
            _compiled_fold_block(torch.zeros(2, 8, dtype=dtype), torch.full((2,), -torch.inf), None, 1.0, None)
            _compiled_dtypes.add(dtype)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
            warnings.warn(f"The entropy reductions run without torch.compile ({type(error).__name__}: {error}); they "
                          "stay correct but are slower. Install a C++ compiler (gcc) to compile them.", stacklevel=2)
            _compiled_fold_block = fold_block
    return None if _compiled_fold_block is fold_block else _compiled_fold_block


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
            size = max(rows * cols, self.token_chunk * self.vocab_block)
            buffer = self._scratch_cache[key] = torch.empty(size, dtype=dtype, device=device)
        return buffer[: rows * cols].view(rows, cols)

    def _entropy_chunk(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        entropy = _OnlineEntropy(x.shape[0], x.device)
        for start in range(0, weight.shape[0], self.vocab_block):
            block = weight[start : start + self.vocab_block]
            z = self._scratch("z", x.shape[0], block.shape[0], x.dtype, x.device)
            torch.matmul(x, block.T, out=z)
            self._fold(entropy, z, bias, start)
        return entropy.value()

    def _fold(self, entropy: "_OnlineEntropy", z: Tensor, bias: Tensor | None, start: int, keep: bool = False) -> None:
        """Fold one logit block z [n, v] (columns start .. start + v of the vocabulary) into ``entropy``: compiled,
        or eagerly where torch.compile is unavailable, which overwrites a float32 z unless ``keep``."""
        block_bias = None if bias is None else bias[start : start + z.shape[1]]
        scale = self.logit_scale / self.temperature
        compiled = _compiled_fold(z.dtype)
        if compiled is not None:
            entropy.add(*compiled(z, entropy.max, block_bias, scale, self.logit_softcap))
            return
        if keep:
            z = self._scratch("kept", z.shape[0], z.shape[1], z.dtype, z.device).copy_(z)
        exp_out = self._scratch("e", z.shape[0], z.shape[1], torch.float32, z.device)
        entropy.add(*fold_block(z, entropy.max, block_bias, scale, exp_out, self.logit_softcap))

    @torch.no_grad()
    def chain_entropy(self, start: Tensor, steps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Entropies along a residual stream h_l = h_{l-1} + a_l + f_l, with the matmuls of h_0 and the steps only.

        In norm mode "none" the logits are linear in the state, so U h_l = U h_{l-1} + U a_l + U f_l: each h_l's
        logits are a running float32 sum of logits already computed for h_0 and the steps (docs/definitions.md §1,
        "Linearity"), block by block of the vocabulary.

        start: h_0 [n, d]; steps: [L, 2, n, d], (a_l, f_l) for l = 1..L. Returns H(h_0) [n], H(steps) [L, 2, n]
        and H(h_l) [L, n], float32 on the CPU (nats).
        """
        if self.norm_mode != "none":
            raise ValueError("chain_entropy needs norm_mode='none' (LNf is not linear)")
        weight, bias = self._matmul_weights()
        n, n_layers = start.shape[0], steps.shape[0]
        start, steps = start.to(device=weight.device, dtype=weight.dtype), steps.to(device=weight.device, dtype=weight.dtype)
        at_start = _OnlineEntropy(n, weight.device)
        at_steps = [[_OnlineEntropy(n, weight.device) for _ in range(2)] for _ in range(n_layers)]
        at_sums = [_OnlineEntropy(n, weight.device) for _ in range(n_layers)]
        for first in range(0, weight.shape[0], self.vocab_block):
            block = weight[first : first + self.vocab_block]
            z = self._scratch("z", n, block.shape[0], weight.dtype, weight.device)
            running = self._scratch("running", n, block.shape[0], torch.float32, weight.device)  # U h_l on this block
            running.copy_(torch.matmul(start, block.T, out=z))
            self._fold(at_start, z, bias, first)
            for layer in range(n_layers):
                for i in range(2):
                    torch.matmul(steps[layer, i], block.T, out=z)
                    running += z
                    self._fold(at_steps[layer][i], z, bias, first)
                self._fold(at_sums[layer], running, bias, first, keep=True)
        stack = lambda values: torch.stack([v.value() for v in values]) if values else torch.empty(0, n)  # noqa: E731
        return at_start.value(), torch.stack([stack(pair) for pair in at_steps]), stack(at_sums)


class _OnlineEntropy:
    """The running (max m, S, T) of one set of rows while vocabulary blocks are folded in (``fold_block``):
    S = sum_j exp(l_j - m), T = sum_j exp(l_j - m) (l_j - m), so H = log S - T / S. Shapes [n], float32."""

    def __init__(self, n: int, device):
        self.max = torch.full((n,), -torch.inf, device=device)
        self.sum_exp = torch.zeros(n, device=device)
        self.sum_exp_z = torch.zeros(n, device=device)

    def add(self, new_max: Tensor, block_sum: Tensor, block_sum_z: Tensor) -> None:
        """Add one block's sums, given relative to ``new_max`` (>= the old max): the old sums are re-expressed
        relative to it (e' = e c and z' = z - shift, c = exp(-shift))."""
        shift = new_max - self.max  # inf on the first block, where the sums are still zero
        c = torch.exp(-shift)
        self.sum_exp_z = (self.sum_exp_z - self.sum_exp * torch.where(self.sum_exp > 0, shift, 0.0)) * c + block_sum_z
        self.sum_exp = self.sum_exp * c + block_sum
        self.max = new_max

    def value(self) -> Tensor:
        return (torch.log(self.sum_exp) - self.sum_exp_z / self.sum_exp).cpu()
