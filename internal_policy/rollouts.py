"""Sampling responses from the full model: batched ``generate`` with a KV cache, stopping at EOS.

The sampling distribution is exactly softmax(logits / temperature) restricted by top-p: the model's own generation
defaults (top-k, repetition penalty, ...) are replaced, so that GRPO's ratios refer to the policy that sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data import Sample, encode, render_prompt
from .loading import LoadedModel


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0


def _eos_ids(tokenizer, model) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def sample_responses(
    loaded: LoadedModel, prompt_ids: list[list[int]], config: SamplingConfig, progress: bool = False
) -> list[list[int]]:
    """Sample one response per prompt. Returns the response token ids, up to and including the first EOS."""
    from transformers import GenerationConfig

    model, tokenizer = loaded.hf_model, loaded.tokenizer
    eos = _eos_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    greedy = config.temperature == 0
    generation_config = GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else config.temperature,
        top_p=None if greedy else config.top_p,
        top_k=None if greedy else 0,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    responses: list[list[int]] = []
    try:
        batches = range(0, len(prompt_ids), config.batch_size)
        for start in tqdm(batches, desc="generating", unit="batch", disable=not progress):
            batch = prompt_ids[start : start + config.batch_size]
            width = max(map(len, batch))
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=loaded.device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=loaded.device)
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config
            )
            for row in output[:, width:].tolist():
                ends = [i for i, token in enumerate(row) if token in eos]
                responses.append(row[: ends[0] + 1] if ends else row)
    finally:
        torch.random.set_rng_state(generator_state)
    return responses


def complete_samples(
    loaded: LoadedModel, samples: list[Sample], n_per_prompt: int, config: SamplingConfig, progress: bool = False
) -> list[Sample]:
    """Give every sample a response: rows that have one are kept as they are; the others get ``n_per_prompt``
    sampled responses each (decoded to text without special tokens, so they are analysed like given ones)."""
    done = [s for s in samples if s.response is not None]
    todo = [s for s in samples if s.response is None]
    if not todo:
        return samples
    expanded = [s for s in todo for _ in range(n_per_prompt)]
    prompt_ids = [encode(loaded.tokenizer, render_prompt(loaded.tokenizer, s.prompt)) for s in expanded]
    responses = sample_responses(loaded, prompt_ids, config, progress=progress)
    generated = []
    for k, (sample, ids) in enumerate(zip(expanded, responses)):
        text = loaded.tokenizer.decode(ids, skip_special_tokens=True)
        generated.append(
            Sample(id=f"{sample.id}#{k % n_per_prompt}", prompt=sample.prompt, response=text, answer=sample.answer, source=sample.source)
        )
    return done + generated
