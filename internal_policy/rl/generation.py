"""Sampling responses from the full model: batched ``generate`` with a KV cache, stopping at EOS.

The sampling distribution is exactly softmax(logits / temperature) restricted by top-p: the model's own generation
defaults (top-k, repetition penalty, ...) are switched off, so that GRPO's ratios refer to the policy that sampled.
The next token is drawn by ``InverseCdfSampler`` from a seeded generator (reproducible per step, as resume needs),
each distinct prompt is prefilled once for its whole group (``prefix.prefilled_cache``), and ``EntropyRecorder``
logs the sampling policy's entropy at every token on the way.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from ..data import Sample, encode, render_prompt
from ..models import LoadedModel
from ..lens.policy import entropy_from_logits
from ..lens.states import cache_keyword, pad_rows


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16  # sequences per generate call
    seed: int = 0


class InverseCdfSampler(LogitsProcessor):
    """The last logits processor: draws the next token from softmax(scores) with one uniform per row (inverse CDF,
    in float64) and returns scores that are 0 at the drawn token and -inf elsewhere, so greedy decoding emits it.

    Why not ``do_sample=True``: torch.multinomial on the CPU draws an exponential variate for every vocabulary
    entry of every row (about 30 ms a step for 32 x 49k), a sixth of the decoding time of a small model.
    """

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        cdf = torch.softmax(scores, dim=-1, dtype=torch.float64).cumsum_(-1)
        u = torch.rand((scores.shape[0], 1), generator=self.generator, dtype=torch.float64).to(cdf.device)
        token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, -torch.inf).scatter_(-1, token, 0.0)


class EntropyRecorder(LogitsProcessor):
    """The first logits processor: records the entropy (nats) of the sampling policy softmax(logits / temperature),
    before top-p, of every row at every decoding step. It leaves the scores unchanged."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.steps: list[Tensor] = []  # one [batch] tensor per decoding step

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.steps.append(entropy_from_logits(scores / self.temperature))  # stays on the device: no sync per step
        return scores


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """The token ids that end a generated response: the model's generation config's EOS ids and the tokenizer's."""
    config = getattr(model, "generation_config", None)
    ids = config.eos_token_id if config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _generation_setup(config: SamplingConfig, eos: list[int], pad: int) -> tuple:
    """A GenerationConfig with every distribution-changing default of the model neutralised, and the processors that
    sample softmax(logits / temperature) under top-p (none for greedy, temperature 0)."""
    from transformers import GenerationConfig, TemperatureLogitsWarper, TopPLogitsWarper

    generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=config.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
        repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0, min_new_tokens=0,
    )
    if config.temperature == 0:
        return generation_config, []
    generator = torch.Generator().manual_seed(config.seed)
    processors = [TemperatureLogitsWarper(config.temperature)] if config.temperature != 1.0 else []
    processors += [TopPLogitsWarper(config.top_p)] if config.top_p < 1.0 else []
    return generation_config, processors + [InverseCdfSampler(generator)]


@torch.no_grad()
def sample_with_entropy(
    loaded: LoadedModel, prompt_ids: list[list[int]], config: SamplingConfig, per_prompt: int = 1, progress: bool = False,
    record_entropy: bool = True,
) -> tuple[list[list[int]], list[Tensor | None]]:
    """Sample ``per_prompt`` responses for each prompt (temperature 0: greedy). Each distinct prompt is prefilled
    once and its cache shared by its responses.

    Returns len(prompt_ids) * per_prompt responses grouped by prompt, each a list of token ids up to and including
    its first EOS, and for each response the entropy (nats) of the sampling policy softmax(logits / temperature) at
    each of its tokens ([len(response)] float32 on the CPU; temperature 1 when greedy), or None without
    ``record_entropy``.
    """
    model, tokenizer = loaded.hf_model, loaded.tokenizer
    eos = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    generation_config, sampling_processors = _generation_setup(config, eos, pad)
    prompts_per_call = max(1, config.batch_size // per_prompt)
    responses: list[list[int]] = []
    entropies: list[Tensor] = []
    batches = range(0, len(prompt_ids), prompts_per_call)
    for start in tqdm(batches, desc="generating", unit="batch", disable=not progress):
        ids, mask = pad_rows(prompt_ids[start : start + prompts_per_call], pad, left=True, device=loaded.device)
        cache = prefilled_cache(model, ids, mask, per_prompt) if ids.shape[1] > 1 else None
        recorder = EntropyRecorder(config.temperature or 1.0) if record_entropy else None
        output = model.generate(
            input_ids=ids.repeat_interleave(per_prompt, 0), attention_mask=mask.repeat_interleave(per_prompt, 0),
            generation_config=generation_config, **({cache_keyword(model): cache} if cache is not None else {}),
            logits_processor=LogitsProcessorList(([recorder] if recorder else []) + sampling_processors),
        )
        step_entropy = torch.stack(recorder.steps, dim=1).cpu() if recorder else None  # [batch, steps]
        for b, row in enumerate(output[:, ids.shape[1] :].tolist()):
            ends = [i for i, token in enumerate(row) if token in eos]
            responses.append(row[: ends[0] + 1] if ends else row)
            entropies.append(None if step_entropy is None else step_entropy[b, : len(responses[-1])])
    return responses, entropies


def sample_responses(
    loaded: LoadedModel, prompt_ids: list[list[int]], config: SamplingConfig, per_prompt: int = 1, progress: bool = False
) -> list[list[int]]:
    """``sample_with_entropy`` without recording the entropies."""
    return sample_with_entropy(loaded, prompt_ids, config, per_prompt, progress, record_entropy=False)[0]


def sample_responses_vllm(location: str, prompt_ids: list[list[int]], config: SamplingConfig, per_prompt: int = 1,
                          dtype: str = "auto", progress: bool = False, **engine_options) -> list[list[int]]:
    """``sample_responses`` through a vLLM engine (a GPU, or vLLM's CPU build) started on the model at ``location`` (a
    folder or Hub id): ``per_prompt`` responses per prompt, grouped by prompt, each up to and including its EOS.

    The same distribution, softmax(logits / T) under top-p (T = 0: greedy), with the model's own generation defaults
    ignored as in the transformers engine; vLLM draws its own random numbers, so sampled tokens differ between the two.
    The engine is shut down on return, which frees its memory for the next model. ``engine_options`` go to
    ``vllm.LLM`` (e.g. revision, trust_remote_code)."""
    import gc

    from vllm import LLM, SamplingParams

    llm = LLM(model=location, dtype=dtype, seed=config.seed, generation_config="vllm",
              max_model_len=max(map(len, prompt_ids)) + config.max_new_tokens, **engine_options)
    try:
        # One request per response (vLLM's prefix cache shares the prompt), each with its own seed; n > 1 in one
        # request would share a seed, and vLLM refuses it for greedy decoding.
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids for _ in range(per_prompt)]
        params = [SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_new_tokens,
                                 seed=config.seed * 1_000_003 + r) for r in range(len(requests))]
        outputs = llm.generate(requests, params, use_tqdm=progress)
        return [list(output.outputs[0].token_ids) for output in outputs]
    finally:
        del llm  # shuts the engine down (its process, when vLLM runs one)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def vllm_available() -> bool:
    """vLLM rollouts need the vllm and trl packages and a CUDA GPU."""
    return all(importlib.util.find_spec(name) for name in ("vllm", "trl")) and torch.cuda.is_available()


class VllmRollouts:
    """Rollouts through vLLM, by TRL's maintained ``VLLMGeneration`` in colocate mode: the engine shares this
    process (and GPU) with the trained model, and ``sample`` first pushes the current weights into it.

    vLLM returns no full-vocabulary entropies, so the trainer computes the logged ``entropy`` with a forward pass;
    and vLLM's sampler is seeded per engine, not per step, so a resumed run does not redraw the same tokens.
    """

    def __init__(self, model, accelerator, tokenizer, config: SamplingConfig, gpu_memory: float, context: int):
        """``gpu_memory``: the fraction of GPU memory vLLM reserves (the trained model and its optimiser need the
        rest); ``context``: the longest prompt + response, which sizes vLLM's KV cache; ``config.batch_size``: the
        sequences of one step on this process."""
        from trl.generation.vllm_generation import VLLMGeneration

        self.engine = VLLMGeneration(model, accelerator, tokenizer, mode="colocate", gpu_memory_utilization=gpu_memory,
                                     max_model_length=context, max_num_seqs=config.batch_size,
                                     temperature=config.temperature, top_p=config.top_p, top_k=0,
                                     max_completion_length=config.max_new_tokens)

    def sample(self, prompt_ids: list[list[int]], per_prompt: int) -> list[list[int]]:
        """``per_prompt`` responses per prompt, grouped by prompt, as token ids up to and including EOS."""
        self.engine.sync_weights()
        repeated = [ids for ids in prompt_ids for _ in range(per_prompt)]
        _, completions, _, _ = self.engine.generate(repeated, None, per_prompt)
        return [list(ids) for ids in completions]


def complete_samples(tokenizer, samples: list[Sample], n_per_prompt: int,
                     generate: Callable[[list[list[int]], int], list[list[int]]],
                     chat_template_kwargs: dict | None = None, stop_ids: list[int] | None = None) -> list[Sample]:
    """Give every sample a response: rows that have one are kept as they are; the others get ``n_per_prompt``
    responses each from ``generate(prompt_ids, n_per_prompt)`` (``sample_responses`` or ``sample_responses_vllm``),
    decoded to text without special tokens, so they are analysed like given ones. A response that ended with one of
    ``stop_ids`` (default: the tokenizer's EOS) keeps that stop token as ``Sample.eos`` (docs/definitions.md §2)."""
    stop_ids = set(stop_ids if stop_ids is not None else stop_token_ids(tokenizer))
    done = [s for s in samples if s.response is not None]
    todo = [s for s in samples if s.response is None]
    if not todo:
        return samples
    expanded = [s for s in todo for _ in range(n_per_prompt)]
    responses = generate([encode(tokenizer, render_prompt(tokenizer, s.prompt, chat_template_kwargs)) for s in todo],
                         n_per_prompt)
    generated = []
    for k, (sample, ids) in enumerate(zip(expanded, responses)):
        stopped = bool(ids) and ids[-1] in stop_ids
        text = tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True)
        generated.append(Sample(id=f"{sample.id}#{k % n_per_prompt}", prompt=sample.prompt, response=text,
                                answer=sample.answer, source=sample.source,
                                eos=tokenizer.convert_ids_to_tokens(ids[-1]) if stopped else None,
                                response_ids=list(ids[:-1] if stopped else ids)))
    return done + generated


def prefilled_cache(model, prompt_ids: Tensor, attention_mask: Tensor, repeats: int):
    """For generation: the key/value cache of left-padded distinct prompts [P, T] without their last token, each
    repeated ``repeats`` times along the batch, ready for ``generate`` on the repeated prompts (which then runs the
    last prompt token itself). Position ids follow ``generate``'s rule for left padding."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    model.get_decoder()(input_ids=prompt_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                        position_ids=positions[:, :-1], use_cache=True, **{cache_keyword(model): cache})
    cache.batch_repeat_interleave(repeats)
    return cache


def generate_responses(loaded: LoadedModel, samples: list[Sample], n: int = 1, *, max_new_tokens: int = 64,
                       temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                       chat_template_kwargs: dict | None = None, progress: bool = False) -> list[Sample]:
    """``samples`` with a response each: rows that have one are kept, the others get ``n`` sampled responses from
    ``loaded`` (softmax(logits / temperature) under top-p; temperature 0 is greedy), as ``ipolicy entropy`` does."""
    sampling = SamplingConfig(max_new_tokens, temperature, top_p, batch_size, seed)
    return complete_samples(loaded.tokenizer, samples, n, lambda ids, k: sample_responses(loaded, ids, sampling, k, progress),
                            chat_template_kwargs, stop_token_ids(loaded.tokenizer, loaded.hf_model))
