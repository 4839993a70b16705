"""GRPO's objective (docs/definitions.md §4), shared by GRPO and BuPO: they differ only in which policy gives the log-probs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# |log ratio| cap, as in verl: exp() of a float32 log-ratio above ~88 is inf, and inf * 0 in the backward of the
# minimum / clamp is NaN. Beyond the cap (r > 4.9e8 or r < 2.1e-9) the token gives no gradient.
MAX_LOG_RATIO = 20.0


def group_advantages(rewards: Tensor, scale_std: bool = True, eps: float = 1e-6) -> Tensor:
    """A_i = (R_i - mean(R)) / (std(R) + eps) within each group. rewards [prompts, group] -> same shape.

    std is the sample standard deviation (unbiased, as in the reference implementations); with ``scale_std=False``
    only the mean is subtracted.
    """
    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    if not scale_std:
        return centered
    return centered / (rewards.std(dim=-1, keepdim=True) + eps)


@dataclass
class LossTerms:
    loss: Tensor  # scalar, to backpropagate
    clip_frac: float  # fraction of tokens where the clipped term was taken
    approx_kl: float  # mean k3 estimate of KL(old || new) over the tokens
    kl_to_reference: float


def clipped_policy_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    normaliser: float | Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    logp_reference: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    clip_ratio_c: float | None = None,
) -> LossTerms:
    """Token-level clipped surrogate, each token's term divided by ``normaliser`` and summed.

    All tensors are [N] over response tokens. ``normaliser`` is a number or an [N] tensor of per-token divisors (see
    ``loss_normaliser``): the mini-batch's token count gives the token mean over the mini-batch (verl's
    ``token-mean``), |o_i| x (number of responses) the paper's mean over responses of per-response token means; either
    way micro-batches with gradient accumulation give exactly the mini-batch's loss:

        l_t  = -min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t)
        l_t  = min(l_t, -clip_ratio_c A_t)  where A_t < 0, with dual-clip (``clip_ratio_c``, verl's, e.g. 3 or 10)
        loss = sum_t (l_t + kl_coef k3(pi_ref, pi_theta)_t - entropy_coef H_t) / normaliser_t

    Both log-ratios (log r_t, and log pi_ref - log pi_theta in k3) are clamped to +-MAX_LOG_RATIO first, so a policy
    that moved far from the old one (a large learning rate, an unnormalised internal layer) cannot overflow to NaN.
    """
    log_ratio = torch.clamp(logp - logp_old, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    surrogate = torch.minimum(unclipped, clipped)
    if clip_ratio_c is not None:  # dual clip: a negative-advantage token's loss is at most -c A
        surrogate = torch.where(advantages < 0, torch.maximum(surrogate, clip_ratio_c * advantages), surrogate)
    loss = -(surrogate / normaliser).sum()
    kl_ref = torch.zeros(())
    if logp_reference is not None and kl_coef:
        delta = torch.clamp(logp_reference - logp, -MAX_LOG_RATIO, MAX_LOG_RATIO)  # k3 estimator of KL(pi_theta || pi_ref): e^d - d - 1
        kl_terms = torch.exp(delta) - delta - 1.0
        loss = loss + kl_coef * (kl_terms / normaliser).sum()
        kl_ref = kl_terms.detach().mean()
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * (entropy / normaliser).sum()
    with torch.no_grad():
        clip_frac = (clipped < unclipped).float().mean().item() if len(logp) else 0.0
        approx_kl = (ratio - 1.0 - log_ratio).mean().item() if len(logp) else 0.0
    return LossTerms(loss, clip_frac, approx_kl, float(kl_ref))


def loss_normaliser(lengths: list[int], mode: str, total_tokens: float, total_sequences: float) -> Tensor:
    """Per-token divisors [sum(lengths)] of the loss of responses with these ``lengths`` (tokens), within a
    mini-batch of ``total_tokens`` tokens in ``total_sequences`` responses (per process, see the trainer):
    ``token-mean`` divides every token by the token count; ``seq-mean-token-mean`` divides each response's tokens
    by its length times the number of responses (the paper's Eq. 3)."""
    if mode == "token-mean":
        return torch.full((sum(lengths),), max(1.0, float(total_tokens)))
    return torch.cat([torch.full((n,), float(n) * total_sequences) for n in lengths])
