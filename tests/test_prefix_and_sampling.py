"""Shared-prompt forwards and sampling, against plain per-sequence computations on tiny float64 models."""

from __future__ import annotations

import pytest
import torch

from internal_policy.models import load_model
from internal_policy.lens.states import LNF, response_states
from internal_policy.rl.generation import SamplingConfig, sample_responses, sample_with_entropy
from tiny_models import tiny_model

# Two prompts of different lengths, with 3 and 2 responses (one of length 1, one empty of inputs after the first).
PROMPTS = [[5, 17, 33, 40, 41], [7, 8, 9]]
ROWS = [(PROMPTS[0], [50, 51, 52, 53]), (PROMPTS[0], [60]), (PROMPTS[0], [61, 62, 63, 64, 65, 66]),
        (PROMPTS[1], [70, 71, 72]), (PROMPTS[1], [80, 81])]


def plain_states(model, rows, layer: int | None):
    """Per row, its own full forward: the states at positions len(prompt)-1 .. end-2 (those that predict the response)."""
    out = []
    for prompt, response in rows:
        ids = torch.tensor([prompt + response])
        hidden = model(input_ids=ids, output_hidden_states=True)
        states = hidden.hidden_states[layer or -1]  # the last entry is LNf(h_L)
        out.append(states[0, len(prompt) - 1 : len(prompt) + len(response) - 1])
    return torch.cat(out)


def tiny_gpt2():
    """GPT-2 layout: blocks in ``transformer.h``, learned positions, LayerNorm."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_embd=32, n_layer=4, n_head=2, n_positions=128, initializer_range=0.5)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_shared_prompt_states_and_gradients_equal_separate_forwards(arch):
    model = tiny_gpt2() if arch == "gpt2" else tiny_model(arch)[0]
    model = model.double()
    weight = torch.randn(model.config.hidden_size, dtype=torch.float64)
    for layer, stop_after in [(None, None), (2, None), (2, 2)]:
        def shared():
            return response_states(model, ROWS, {layer} if layer else set(), stop_after=stop_after)[layer or LNF]

        def plain():
            return plain_states(model, ROWS, layer)

        assert shared().shape == (sum(len(r) for _, r in ROWS), model.config.hidden_size)
        torch.testing.assert_close(shared(), plain(), rtol=0, atol=1e-10)
        g_shared, g_plain = gradients(model, shared, weight), gradients(model, plain, weight)
        assert g_shared.keys() == g_plain.keys()
        for name in g_plain:
            # Transformers' RMSNorm computes in float32 even in a float64 model, so a gradient is rounded to float32
            # at every norm, and summing the G rows' gradients before that rounding (shared prompt) or after it
            # (separate forwards) differs at float32 precision. A missing or doubled row would be off by O(1).
            error = torch.linalg.norm(g_shared[name] - g_plain[name]) / torch.linalg.norm(g_plain[name])
            assert torch.linalg.norm(g_plain[name]) > 0 and error < 1e-5, (name, float(error))


def gradients(model, states_fn, weight) -> dict:
    model.zero_grad()
    (states_fn() @ weight).pow(2).sum().backward()  # nonlinear, so every row's gradient differs
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_sampling(model, prompt, n, max_new_tokens, temperature, top_p, generator, eos):
    """Independent sampler: a full forward per token (no cache), softmax(logits / T) in float64, top-p by sorting,
    and the inverse CDF with one uniform per response per step, drawn in the same order as the batched sampler."""
    sequences = [list(prompt) for _ in range(n)]
    done = [False] * n
    for _ in range(max_new_tokens):
        u = torch.rand((n, 1), generator=generator, dtype=torch.float64)
        for i in range(n):
            if done[i]:
                continue
            logits = model(input_ids=torch.tensor([sequences[i]])).logits[0, -1].double() / temperature
            probs = torch.softmax(logits, -1)
            order = probs.argsort(descending=True)
            keep = probs[order].cumsum(0) - probs[order] < top_p  # the smallest set whose mass reaches top_p
            filtered = torch.zeros_like(probs)
            filtered[order[keep]] = probs[order[keep]]
            cdf = filtered.cumsum(0)
            token = int(torch.searchsorted(cdf, u[i] * cdf[-1], right=True))
            sequences[i].append(token)
            done[i] = token in eos
        if all(done):
            break
    return [s[len(prompt) :] for s in sequences]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_tokens_equal_an_independent_sampler(tiny_llama, temperature, top_p):
    loaded = load_model(str(tiny_llama), dtype="float64", device="cpu")
    model = loaded.hf_model
    model.generation_config.repetition_penalty = 3.0  # model defaults must not leak into the sampled distribution
    model.generation_config.top_k = 2
    prompt = loaded.tokenizer("What is 12 + 7?")["input_ids"]
    config = SamplingConfig(max_new_tokens=12, temperature=temperature, top_p=top_p, batch_size=8, seed=3)
    got = sample_responses(loaded, [prompt], config, per_prompt=4)
    eos = [loaded.tokenizer.eos_token_id]
    expected = reference_sampling(model, prompt, 4, 12, temperature, top_p, torch.Generator().manual_seed(3), eos)
    expected = [s[: s.index(eos[0]) + 1] if eos[0] in s else s for s in expected]
    assert got == expected
    assert len({tuple(r) for r in got}) > 1  # the draws differ between the responses of a group


def test_grouped_generation_equals_one_prompt_at_a_time(tiny_llama):
    """Left padding and the shared prefill do not change greedy decoding."""
    loaded = load_model(str(tiny_llama), dtype="float64", device="cpu")
    prompts = [loaded.tokenizer(t)["input_ids"] for t in ["What is 12 + 7?", "hello", "the quick brown fox jumps"]]
    config = SamplingConfig(max_new_tokens=10, temperature=0, batch_size=6)
    together = sample_responses(loaded, prompts, config, per_prompt=2)
    alone = [r for p in prompts for r in sample_responses(loaded, [p], SamplingConfig(10, 0, batch_size=1))]
    assert together == [r for r in alone for _ in range(2)]


def test_recorded_entropies_are_those_of_the_sampling_policy(tiny_llama):
    loaded = load_model(str(tiny_llama), dtype="float64", device="cpu")
    prompts = [loaded.tokenizer(t)["input_ids"] for t in ["What is 12 + 7?", "hello world"]]
    config = SamplingConfig(max_new_tokens=8, temperature=0.8, top_p=0.9, batch_size=8, seed=1)
    responses, entropies = sample_with_entropy(loaded, prompts, config, per_prompt=3)
    assert [len(h) for h in entropies] == [len(r) for r in responses]
    for k, (response, recorded) in enumerate(zip(responses, entropies)):
        prompt = prompts[k // 3]
        logits = loaded.hf_model(input_ids=torch.tensor([prompt + response])).logits[0].double()
        p = torch.softmax(logits[len(prompt) - 1 : -1] / 0.8, -1)  # before top-p: the policy, not the sampler
        expected = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
        torch.testing.assert_close(recorded.double(), expected, rtol=0, atol=1e-4)
    assert torch.cat(entropies).std() > 0.05  # peaked and flat positions both occur: the check can fail


def test_one_token_and_empty_responses():
    model, _ = tiny_model("llama")
    model = model.double()
    rows = [(PROMPTS[0], [60]), (PROMPTS[1], []), (PROMPTS[1], [61])]
    with torch.no_grad():
        shared = response_states(model, rows, set())[LNF]
        torch.testing.assert_close(shared, plain_states(model, rows, None), rtol=0, atol=1e-10)
    assert shared.shape[0] == 2
