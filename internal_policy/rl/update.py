"""The trainer's update part: one step's PPO epochs over mini-batches of its rollouts, with the clipped objective
(``losses``) on the phase's policy: pi(h_K) in BuPO's internal phase, the full policy pi(LNf(h_L)) after it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import IPolicyError
from ..lens.policy import PolicyHead
from ..lens.states import LNF
from .losses import clipped_policy_loss, group_advantages, loss_normaliser
from .rollout import Rollout

Rows = list[tuple[list[int], list[int]]]  # (prompt ids, response ids) per sequence


@dataclass
class PolicyUpdate:
    """Applies one step's update. ``policy``: the accelerate-wrapped ``ResponseForward`` of the trained model, and
    ``head`` its policy head; ``reference`` and ``reference_head``: the frozen base model's (KL penalty), or None;
    ``monitor_layer``: the layer whose policy entropy is logged as ``internal_entropy``."""

    config: object  # TrainConfig
    accelerator: object
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    head: PolicyHead
    reference: torch.nn.Module | None
    reference_head: PolicyHead | None
    monitor_layer: int
    pad: int

    def __call__(self, step: int, groups: list[Rollout], layer: int | None) -> dict:
        """Update on ``groups``; ``layer``: K in BuPO's internal phase, None for the full policy. Returns the step's
        statistics (sampling entropy, internal entropy, clip fraction, KLs, gradient norm)."""
        c = self.config
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
        row_advantage = group_advantages(rewards, scale_std=c.std_scaling).flatten().tolist()
        rows = [(g.prompt_ids, r) for g in groups for r in g.responses]
        sampling_entropy = self._sampling_entropy(groups, rows)  # before the update changes the policy
        # On-policy (one epoch, one mini-batch): before the update the old log-probs equal the new ones, so the
        # separate no-grad pass is skipped and old = new.detach() from the training forward, in both phases.
        mini_prompts = (c.mini_batch_prompts // self.accelerator.num_processes) if c.mini_batch_prompts else len(groups)
        on_policy = c.ppo_epochs == 1 and mini_prompts >= len(groups)
        old = {} if on_policy else self._old_log_probs(rows, layer)
        stats = dict(clip_frac=[], approx_kl=[], kl_ref=[], grad_norm=[])
        for _ in range(c.ppo_epochs):
            for first in range(0, len(groups), mini_prompts):
                mini_rows = list(range(first * c.group_size, min(len(groups), first + mini_prompts) * c.group_size))
                self._mini_batch(step, rows, mini_rows, row_advantage, layer, old, on_policy, stats)
        mean = lambda xs: float(sum(xs) / len(xs)) if xs else 0.0  # noqa: E731
        return {
            "rewards": rewards,
            "entropy": sampling_entropy,
            "internal_entropy": float(torch.cat([old[r]["internal_entropy"] for r in sorted(old)]).mean()),
            "clip_frac": mean(stats["clip_frac"]),
            "approx_kl": mean(stats["approx_kl"]),
            "kl_to_reference": mean(stats["kl_ref"]),
            "grad_norm": mean(stats["grad_norm"]),
            "n_tokens": sum(len(r) for _, r in rows),
            "n_rows": len(rows),
        }

    def _mini_batch(self, step, rows: Rows, mini_rows: list[int], row_advantage, layer, old: dict, on_policy: bool,
                    stats: dict) -> None:
        """Accumulate the gradient of the mini-batch ``mini_rows`` micro-batch by micro-batch, then one optimiser step."""
        c = self.config
        total_tokens, total_sequences = self._mini_batch_size(sum(len(rows[r][1]) for r in mini_rows), len(mini_rows))
        for start in range(0, len(mini_rows), c.micro_batch_size):
            chosen = mini_rows[start : start + c.micro_batch_size]
            chunk = [rows[r] for r in chosen]
            targets = self._targets(chunk)
            keep = {self.monitor_layer} if on_policy else set()
            captured, (logp, entropy) = self._phase_states(self.policy, chunk, layer, keep=keep,
                                                           readout=self._readout(layer, targets))
            if on_policy:
                old.update(self._split(chosen, rows, self._before_update(chunk, layer, logp, captured)))
            old_logp = torch.cat([old[r]["logp"] for r in chosen])
            ref = torch.cat([old[r]["ref"] for r in chosen]) if self.reference is not None else None
            advantages = torch.cat([torch.full((len(rows[r][1]),), row_advantage[r]) for r in chosen]).to(logp.device)
            normaliser = loss_normaliser([len(rows[r][1]) for r in chosen], c.loss_agg_mode, total_tokens,
                                         total_sequences).to(logp.device)
            terms = clipped_policy_loss(logp, old_logp, advantages, normaliser, c.clip_low, c.clip_high, ref, c.kl_coef,
                                        entropy, c.entropy_coef, c.clip_ratio_c)
            self.accelerator.backward(terms.loss)
            stats["clip_frac"].append(terms.clip_frac)
            stats["approx_kl"].append(terms.approx_kl)
            stats["kl_ref"].append(terms.kl_to_reference)
        grad_norm = self.accelerator.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
        if not torch.isfinite(grad_norm):  # the same on every process: DDP all-reduced the gradients
            raise IPolicyError(
                f"Step {step}: the gradient is not finite (the loss diverged), so the update was not applied and no "
                "checkpoint of this step is written. Fix: lower `lr` (or `clip_high`) and train into a new `out`."
            )
        stats["grad_norm"].append(float(grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ states and log-probs
    def _phase_states(self, forward, rows: Rows, layer: int | None, keep: set[int] = frozenset(), readout=None):
        """Through ``forward`` (a ResponseForward, maybe wrapped by accelerate), for the response tokens of ``rows``,
        [N, d] each: the states of the phase's policy (h_K, or LNf(h_L) when layer is None), and {l: h_l} for the
        layers in ``keep``. The forward stops at the highest layer it needs. With ``readout``: (states, its result)."""
        wanted = set(keep) | ({layer} if layer else set())
        out = forward(rows, wanted, max(wanted) if layer else None, self.pad, readout)
        return out if readout else (out[layer or LNF], out)

    def _readout(self, layer: int | None, targets: Tensor):
        """The training readout: log-probs of ``targets`` under the phase's policy, and its entropy when the loss has
        an entropy bonus (else None). Differentiable; it runs inside the wrapped forward (DDP needs the unembedding
        used there)."""
        def readout(states: dict):
            phase = states[layer or LNF]
            if self.config.entropy_coef:
                return self.head.log_probs_and_entropy(phase, targets)
            return self.head.log_probs(phase, targets), None

        return readout

    def _targets(self, rows: Rows) -> Tensor:
        return torch.tensor([t for _, r in rows for t in r], device=self.accelerator.device)

    def _mini_batch_size(self, local_tokens: int, local_sequences: int) -> tuple[float, float]:
        """The mini-batch's tokens and responses as the loss divides by them: with P processes, DDP averages the P
        gradients, so each process divides by (all processes' count) / P, which makes the update exactly the mean
        over the whole mini-batch."""
        if self.accelerator.num_processes == 1:
            return float(local_tokens), float(local_sequences)
        local = torch.tensor([float(local_tokens), float(local_sequences)], device=self.accelerator.device)
        tokens, sequences = (self.accelerator.reduce(local, "sum") / self.accelerator.num_processes).tolist()
        return tokens, sequences

    @torch.no_grad()
    def _sampling_entropy(self, groups: list[Rollout], rows: Rows) -> float:
        """The sampling (full) policy's entropy, token mean over the rollouts: as recorded during generation, or, where
        the rollout backend records none (vLLM), from a forward pass of the model as it sampled (before the update)."""
        recorded = [h for g in groups for h in g.entropies]
        if recorded and all(h is not None for h in recorded):
            return float(torch.cat(recorded).mean())
        forward = self.accelerator.unwrap_model(self.policy)
        micro = self.config.micro_batch_size
        entropies = [self.head.entropy(self._phase_states(forward, rows[start : start + micro], None)[0])
                     for start in range(0, len(rows), micro)]
        return float(torch.cat(entropies).mean())

    @torch.no_grad()
    def _old_log_probs(self, rows: Rows, layer: int | None) -> dict[int, dict]:
        """Per row, before the update: the phase policy's log-probs, the reference's (KL), and the logged entropy of
        the monitored layer's policy."""
        old: dict[int, dict] = {}
        forward = self.accelerator.unwrap_model(self.policy)
        micro = self.config.micro_batch_size
        for start in range(0, len(rows), micro):
            chosen = list(range(start, min(len(rows), start + micro)))
            chunk = [rows[r] for r in chosen]
            with self.accelerator.autocast():  # the precision of the training forward, so an unchanged model gives r = 1
                phase, states = self._phase_states(forward, chunk, layer, keep={self.monitor_layer})
                logp = self.head.log_probs(phase, self._targets(chunk))
            old.update(self._split(chosen, rows, self._before_update(chunk, layer, logp, states)))
        return old

    @staticmethod
    def _split(chosen: list[int], rows: Rows, values: dict) -> dict[int, dict]:
        """Token-concatenated values of the rows ``chosen`` -> one dict per row."""
        out, offset = {}, 0
        for r in chosen:
            n = len(rows[r][1])
            out[r] = {k: (None if v is None else v[offset : offset + n]) for k, v in values.items()}
            offset += n
        return out

    @torch.no_grad()
    def _before_update(self, rows: Rows, layer: int | None, logp: Tensor, states: dict) -> dict:
        """What the update compares against for these rows: the phase policy's log-probs, the reference's (KL), and
        the logged entropy of the monitored layer's policy."""
        return dict(logp=logp.detach(), ref=self._reference_log_probs(rows, layer),
                    internal_entropy=self.head.entropy(states[self.monitor_layer].detach()))

    @torch.no_grad()
    def _reference_log_probs(self, rows: Rows, layer: int | None):
        """log-probs of the frozen base model's policy of the same phase (for the KL penalty), or None."""
        if self.reference is None:
            return None
        with self.accelerator.autocast():  # the precision of the policy's forward and readout
            states, _ = self._phase_states(self.reference, rows, layer)
            return self.reference_head.log_probs(states, self._targets(rows))
