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
    normaliser: float,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    logp_reference: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> LossTerms:
    """Token-level clipped surrogate, summed over these tokens and divided by ``normaliser``.

    All tensors are [N] over response tokens. ``normaliser`` is the number of response tokens of the whole
    mini-batch, so that micro-batches with gradient accumulation give exactly the token mean over the mini-batch:

        loss = -1/n * sum_t min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t)
               + kl_coef * 1/n * sum_t k3(pi_ref, pi_theta)_t - entropy_coef * 1/n * sum_t H_t

    Both log-ratios (log r_t, and log pi_ref - log pi_theta in k3) are clamped to +-MAX_LOG_RATIO first, so a policy
    that moved far from the old one (a large learning rate, an unnormalised internal layer) cannot overflow to NaN.
    """
    log_ratio = torch.clamp(logp - logp_old, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    surrogate = torch.minimum(unclipped, clipped)
    loss = -surrogate.sum() / normaliser
    kl_ref = torch.zeros(())
    if logp_reference is not None and kl_coef:
        delta = torch.clamp(logp_reference - logp, -MAX_LOG_RATIO, MAX_LOG_RATIO)  # k3 estimator of KL(pi_theta || pi_ref): e^d - d - 1
        kl_terms = torch.exp(delta) - delta - 1.0
        loss = loss + kl_coef * kl_terms.sum() / normaliser
        kl_ref = kl_terms.detach().mean()
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * entropy.sum() / normaliser
    with torch.no_grad():
        clip_frac = (clipped < unclipped).float().mean().item() if len(logp) else 0.0
        approx_kl = (ratio - 1.0 - log_ratio).mean().item() if len(logp) else 0.0
    return LossTerms(loss, clip_frac, approx_kl, float(kl_ref))
