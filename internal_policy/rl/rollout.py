"""The trainer's rollout part: which prompts a step takes, and their groups of sampled, scored responses."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from torch import Tensor

from ..data import Sample
from ..models import LoadedModel
from .generation import SamplingConfig, sample_with_entropy
from .rewards import score


@dataclass
class Rollout:
    """One prompt's group: token ids and rewards. ``responses`` include the EOS token when one was sampled."""

    sample: Sample
    prompt_ids: list[int]
    responses: list[list[int]]
    rewards: list[float]
    texts: list[str] = field(default_factory=list)
    entropies: list[Tensor | None] = field(default_factory=list)  # per response: the sampling policy's entropy per token


def prompts_for_step(step: int, n_prompts: int, per_step: int, seed: int, process: int = 0, processes: int = 1) -> list[int]:
    """Indices of the prompts of ``step`` (1-based) for this process: a fresh seeded permutation of the ``n_prompts``
    per pass over the data, ``per_step`` prompts a step, dealt round-robin over the processes."""
    out = []
    for position in range((step - 1) * per_step, step * per_step):
        epoch = position // n_prompts
        order = list(range(n_prompts))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[position % n_prompts])
    return out[process::processes]


@dataclass
class RolloutSampler:
    """Samples ``group_size`` responses for each prompt of a step from the current model, and scores them.

    ``prompt_texts`` / ``prompt_ids``: every training prompt rendered and tokenized once; ``vllm``: a
    ``VllmRollouts`` engine, or None for transformers' ``generate`` (under ``autocast``, the training precision)."""

    samples: list[Sample]
    prompt_texts: list[str]
    prompt_ids: list[list[int]]
    tokenizer: object
    reward_fn: object
    sampling: SamplingConfig
    group_size: int
    vllm: object | None = None

    def __call__(self, step_seed: int, indices: list[int], loaded: LoadedModel, autocast) -> list[Rollout]:
        prompt_ids = [self.prompt_ids[i] for i in indices]
        if self.vllm is not None:
            responses = self.vllm.sample(prompt_ids, self.group_size)
            entropies = [None] * len(responses)
        else:
            sampling = SamplingConfig(self.sampling.max_new_tokens, self.sampling.temperature, self.sampling.top_p,
                                      batch_size=len(prompt_ids) * self.group_size, seed=step_seed)
            with autocast():
                responses, entropies = sample_with_entropy(loaded, prompt_ids, sampling, per_prompt=self.group_size)
        groups = []
        for j, i in enumerate(indices):
            members = slice(j * self.group_size, (j + 1) * self.group_size)
            texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses[members]]
            rewards = [score(self.reward_fn, self.prompt_texts[i], t, self.samples[i].answer,
                             f"on prompt {i} ('{self.samples[i].id}'), response {k}") for k, t in enumerate(texts)]
            groups.append(Rollout(self.samples[i], self.prompt_ids[i], responses[members], rewards, texts,
                                  entropies[members]))
        return groups
