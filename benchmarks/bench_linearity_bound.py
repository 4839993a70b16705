"""The most that layer outputs from module logits could gain on this machine: a measured upper bound.

    python benchmarks/bench_linearity_bound.py [--problems 8] [--response-tokens 128] [--repeats 5]

In norm mode ``none`` a policy's logits are linear in its state, and a pre-norm block adds its modules' outputs to the
residual stream, so U h_l = U h_{l-1} + U a_l + U f_l. The logits of the inner layer outputs h_1 .. h_{L-1} could be
summed from tiles the engine computes anyway instead of unembedded: 4L + 2 matmuls per token instead of 5L + 1. Each
such state still needs its entropy fold, and each of its logit tiles two additions (h_{l-1}'s tile + a_l's + f_l's).

Measured side by side in one run, on the engine's own kernel (``PolicyHead``, 512-row chunks, 4096-row vocabulary
blocks) and real SmolLM2-135M-Instruct states, exact (float32) and fast (bfloat16 matmul):

* the engine's time on the benchmark samples (as in bench_entropy.py: 8 MATH-500 problems, 128 sampled tokens each);
* per 512-row chunk of one state, over the whole vocabulary: matmul + fold (what the engine does), the matmul alone,
  and one float32 tile addition into a running logit buffer.

The bound is engine time / (engine time - (L - 1) x chunks per state x (matmul - 2 additions)). It charges nothing
for holding the running logits, copying them before the fold overwrites them, re-anchoring, the identity check or the
bounded-memory forward that holding them needs, so no implementation of the idea on this machine can do better.
Appends each run to ``benchmarks/results/linearity_bound.json`` (``runs``), so repeated runs show the spread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_entropy import (  # also puts this tree's internal_policy on sys.path
    ROOT,
    make_samples,
    time_engine,
)

from internal_policy.data import tokenize_sample
from internal_policy.lens.policy import _fast_fold_block, fold_block
from internal_policy.models import load_model


def best_seconds(function, repeats: int) -> float:
    """The fastest of ``repeats`` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def chunk_costs(head, states: torch.Tensor, fast: bool, repeats: int) -> dict:
    """Seconds per ``head.token_chunk`` rows of one state over the whole vocabulary: the engine's matmul + fold, the
    matmul alone, and one tile addition into a running float32 logit buffer of the chunk's [rows, vocab]."""
    weight, bias = head._matmul_weights()
    x = states[: head.token_chunk].to(weight.dtype)
    rows, block = x.shape[0], head.vocab_block
    z = torch.empty(rows, block, dtype=weight.dtype)
    running = torch.zeros(rows, weight.shape[0])  # held across a layer: it does not stay in cache

    def matmul_only():
        for start in range(0, weight.shape[0], block):
            torch.matmul(x, weight[start : start + block].T, out=z[:, : min(block, weight.shape[0] - start)])

    def add_only():
        for start in range(0, weight.shape[0], block):
            width = min(block, weight.shape[0] - start)
            running[:, start : start + width].add_(z[:, :width])

    if fast:
        _fast_fold_block()  # compile outside the timing
    return {
        "matmul_and_fold_s": best_seconds(lambda: head._entropy_chunk(x, weight, bias), repeats),
        "matmul_s": best_seconds(matmul_only, repeats),
        "tile_add_s": best_seconds(add_only, repeats),
        "fold": "compiled" if fast else fold_block.__name__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timings of each kernel piece (the fastest counts)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "linearity_bound.json")
    args = parser.parse_args()

    loaded = load_model("smollm2-135m-instruct", device="cpu")
    samples = make_samples(loaded, args.problems, args.response_tokens)
    tokenized = [tokenize_sample(loaded.tokenizer, s) for s in samples]
    n_tokens = sum(len(t.response_ids) for t in tokenized)
    n_layers = loaded.n_layers
    with torch.inference_mode():
        hidden = loaded.hf_model(torch.tensor([tokenized[0].input_ids]), output_hidden_states=True).hidden_states
        states = torch.cat([h[0] for h in hidden[1:-1]])[torch.randperm(sum(h.shape[1] for h in hidden[1:-1]))]

    results = {"model": "SmolLM2-135M-Instruct", "layers": n_layers, "response_tokens": n_tokens,
               "threads": torch.get_num_threads(), "matmuls_per_token_now": 5 * n_layers + 1,
               "matmuls_per_token_with_linearity": 4 * n_layers + 2}
    time_engine(loaded, tokenized[:1])  # warm-up
    for mode, fast in (("exact", False), ("fast", True)):
        head = loaded.policy_head(norm_mode="none", fast=fast)
        with torch.inference_mode():
            costs = chunk_costs(head, states, fast, args.repeats)
        time_engine(loaded, tokenized[:1], fast=fast)  # fast: its compile
        engine_s = time_engine(loaded, tokenized, fast=fast)
        chunks_per_state = n_tokens / head.token_chunk
        saving_s = (n_layers - 1) * chunks_per_state * (costs["matmul_s"] - 2 * costs["tile_add_s"])
        results[mode] = {
            **costs,
            "engine_s": engine_s,
            "unembedding_share_of_engine": (5 * n_layers + 1) * chunks_per_state * costs["matmul_and_fold_s"] / engine_s,
            "matmul_share_of_unembedding": costs["matmul_s"] / costs["matmul_and_fold_s"],
            "best_possible_saving_s": saving_s,
            "best_possible_speedup": engine_s / (engine_s - saving_s),
        }

    runs = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs + [results]}, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
