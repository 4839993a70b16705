"""Entropy engine benchmark: speed against the straightforward implementation and the matmul roofline, and memory.

    python benchmarks/bench_entropy.py [--problems 8] [--response-tokens 128] [--memory-tokens 3000] [--reference-memory]
                                       [--top-k 5] [--top-k-only]

Side by side in one process on SmolLM2-135M-Instruct (the embedded model), float32 weights:

* straightforward: PyTorch forward hooks on the HF modules, full softmax of every state where it is used, float32,
  one sample at a time (tests/reference.py with dtype=float32);
* engine exact: ``EntropyEngine`` (TransformerBridge hooks, streamed blocked entropy, float32 matmuls);
* engine fast: the same with the unembedding matmul in bfloat16 and the block reductions compiled (torch.compile;
  its one-time compile runs in a warm-up before the timing and is reported as ``fast_warmup_s``);
* roofline: the time the unembedding matmuls of the distinct states alone take at the measured peak float32 (and
  bfloat16) matmul rate of this machine.

Peak RSS of one long sample is measured in a fresh subprocess per implementation.

``top_k_side_by_side``: what the predictions cost (docs/definitions.md, "What a policy predicts"): the engine without
and with ``--top-k`` alternating in one process, exact and fast, the 3000-token peak memory of both, and their
agreement with the straightforward float32 implementation. ``--top-k-only`` measures just that.

With ``--before REV`` the engine of an earlier commit (checked out in a git worktree) is timed against this one,
side by side: fresh processes, alternating, on the same samples, each timed after a warm-up; the minimum of
``--repeats`` runs each, and the 3000-token peak memory of both. This is how the linearity attempt of commit 2ce8b1b
(4L + 2 instead of 5L + 1 unembedding matmuls per token) was measured, and not kept:
``benchmarks/results/linearity_side_by_side.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
CODE = Path(os.environ.get("IPOLICY_BENCH_CODE", ROOT))  # whose internal_policy runs: --before's children set it
sys.path[:0] = [str(CODE), str(ROOT / "tests")]
DATA = "math500"  # the built-in MATH-500 copy (internal_policy/datasets)

from internal_policy.data import Sample, load_samples, tokenize_sample  # noqa: E402
from internal_policy.lens.engine import EngineConfig, EntropyEngine  # noqa: E402
from internal_policy.models import load_model  # noqa: E402


def peak_matmul_gflops(d: int, vocab: int, dtype: torch.dtype) -> float:
    """Best rate over a few unembedding-shaped matmuls [n, d] @ [d, vocab]."""
    weight = torch.randn(vocab, d).to(dtype)
    best = 0.0
    for n in (256, 512, 1024):
        x = torch.randn(n, d).to(dtype)
        x @ weight.T
        start = time.perf_counter()
        for _ in range(3):
            x @ weight.T
        seconds = (time.perf_counter() - start) / 3
        best = max(best, 2 * n * d * vocab / seconds / 1e9)
    return best


def make_samples(loaded, problems: int, response_tokens: int) -> list[Sample]:
    samples = load_samples(DATA, limit=problems)
    prompts = [tokenize_sample(loaded.tokenizer, Sample(s.id, s.prompt, "")).prompt_ids for s in samples]
    # sample with the model, then force exactly response_tokens by continuing past EOS if needed
    from transformers import GenerationConfig

    torch.manual_seed(0)
    out = []
    for sample, ids in zip(samples, prompts):
        generated = loaded.hf_model.generate(
            torch.tensor([ids]), generation_config=GenerationConfig(
                do_sample=True, top_k=0, max_new_tokens=response_tokens, min_new_tokens=response_tokens,
                pad_token_id=loaded.tokenizer.pad_token_id))
        text = loaded.tokenizer.decode(generated[0, len(ids):], skip_special_tokens=True)
        out.append(Sample(sample.id, sample.prompt, text))
    return out


def time_engine(loaded, tokenized, **config) -> float:
    engine = EntropyEngine(loaded, EngineConfig(**config))
    start = time.perf_counter()
    for batch in engine.batches(tokenized):
        engine.analyse_batch([tokenized[i] for i in batch], sample_index=batch)
    return time.perf_counter() - start


def top_k_side_by_side(loaded, tokenized, samples, k: int, repeats: int, memory_tokens: int) -> dict:
    """What predictions (top-k and the sampled token's rank) cost and how exact they are: the engine without and with
    ``top_k`` alternating in this process, ``repeats`` times each (the minimum counts), in both modes; the
    ``memory_tokens`` peak RSS of both in fresh processes; and the top-k ids, probabilities and ranks of the exact
    engine against the straightforward float32 implementation (a full softmax per state, stable sort) on two samples."""
    from reference import reference_token_table
    from transformers import AutoModelForCausalLM

    out: dict = {"top_k": k}
    for mode in ("exact", "fast"):
        times: dict[int, list[float]] = {0: [], k: []}
        for _ in range(repeats):
            for top_k in (0, k):
                times[top_k].append(time_engine(loaded, tokenized, fast=mode == "fast", top_k=top_k))
        out[f"{mode}_without_s"], out[f"{mode}_with_s"] = times[0], times[k]
        out[f"{mode}_slowdown"] = min(times[k]) / min(times[0])
    if memory_tokens > 0:
        for top_k in (0, k):
            out[f"memory_top_k_{top_k}"] = [json.loads(subprocess.run(
                [sys.executable, __file__, "--memory-child", "engine", "--memory-tokens", str(memory_tokens),
                 "--top-k", str(top_k)], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
                for _ in range(2)]
        peaks = {t: min(r["peak_rss_gb"] for r in out[f"memory_top_k_{t}"]) for t in (0, k)}
        out["memory_ratio"] = peaks[k] / peaks[0]
    plain = AutoModelForCausalLM.from_pretrained(loaded.hf_model.name_or_path).eval()
    rows = [{"prompt": s.prompt, "response": s.response} for s in samples[:2]]
    reference = reference_token_table(plain, loaded.tokenizer, rows, dtype=torch.float32, top_k=k)
    engine = EntropyEngine(loaded, EngineConfig(top_k=k))
    mine = pd.concat([engine.analyse_batch([t], [i])[1].to_pandas() for i, t in enumerate(tokenized[:2])])
    merged = mine.merge(reference, on=["sample_index", "position", "layer", "state"], suffixes=("", "_ref"))
    out["agreement_rows"] = len(merged)
    out["top_ids_equal"] = float(sum(list(a) == b for a, b in zip(merged["top_ids"], merged["top_ids_ref"])) / len(merged))
    out["token_rank_equal"] = float((merged["token_rank"] == merged["token_rank_ref"]).mean())
    out["token_rank_max_abs_diff"] = int((merged["token_rank"] - merged["token_rank_ref"]).abs().max())
    # The engine counts logits within the float32 rounding of the sampled one as equal (docs/definitions.md), the
    # straightforward float32 path compares its own roundings exactly: they can differ only where another logit lies
    # that close. Beyond it (no other logit within 1e-4 of the largest |logit|) the ranks must be equal.
    clear = merged["nearest_gap"] > 1e-4
    out["rows_with_a_logit_near_the_sampled_one"] = float(1 - clear.mean())
    out["token_rank_equal_beyond_rounding"] = float((merged["token_rank"] == merged["token_rank_ref"])[clear].mean())
    out["rank_1_agrees"] = float(((merged["token_rank"] == 1) == (merged["token_rank_ref"] == 1)).mean())
    out["top_probs_max_abs_diff"] = float(max(abs(x - y) for a, b in zip(merged["top_probs"], merged["top_probs_ref"])
                                             for x, y in zip(a, b)))
    out["token_prob_max_abs_diff"] = float((merged["token_prob"] - merged["token_prob_ref"]).abs().max())
    return out


def time_child(samples_file: Path, fast: bool) -> None:
    """Run in a fresh process, with whatever ``internal_policy`` is first on sys.path (this tree or an earlier
    commit's worktree): time the engine on the samples in ``samples_file`` after a one-sample warm-up (which
    includes fast mode's compile); print the seconds, the layer means and the code's location as JSON."""
    import internal_policy

    loaded = load_model("smollm2-135m-instruct", device="cpu")
    rows = json.loads(samples_file.read_text())
    tokenized = [tokenize_sample(loaded.tokenizer, Sample(r["id"], r["prompt"], r["response"])) for r in rows]
    engine = EntropyEngine(loaded, EngineConfig(fast=fast))
    engine.analyse(tokenized[:1])
    start = time.perf_counter()
    table = pd.concat([engine.analyse([tokenized[i] for i in batch], sample_index=batch) for batch in engine.batches(tokenized)])
    seconds = time.perf_counter() - start
    means = table.groupby(["layer", "module"])["entropy_out"].mean()
    print(json.dumps({"seconds": seconds, "code": str(Path(internal_policy.__file__).parent),
                      "means": {f"{layer}/{module}": float(v) for (layer, module), v in means.items()}}))


def child(code: Path, *args: str) -> dict:
    """Run this script's child mode with ``internal_policy`` imported from ``code``; its last JSON line."""
    env = {**os.environ, "IPOLICY_BENCH_CODE": str(code)}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True, cwd=code, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def side_by_side(before: str, samples: list[Sample], repeats: int, memory_tokens: int) -> dict:
    """The engine at commit ``before`` against this tree's, alternating fresh processes (see the module docstring)."""
    tree = Path(tempfile.gettempdir()) / f"ipolicy-before-{before}"
    if not tree.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), before], cwd=ROOT, check=True, capture_output=True)
    samples_file = Path(tempfile.mkdtemp()) / "samples.json"
    samples_file.write_text(json.dumps([{"id": s.id, "prompt": s.prompt, "response": s.response} for s in samples]))
    out: dict = {"before": before}
    for mode in ("exact", "fast"):
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for _ in range(repeats):
            for name, code in (("before", tree), ("after", ROOT)):
                runs[name].append(child(code, "--time-child", str(samples_file), *(["--fast"] if mode == "fast" else [])))
        for name in runs:
            out[f"{mode}_{name}_s"] = [r["seconds"] for r in runs[name]]
        out[f"{mode}_speedup"] = min(out[f"{mode}_before_s"]) / min(out[f"{mode}_after_s"])
        before_means, after_means = runs["before"][0]["means"], runs["after"][0]["means"]
        out[f"{mode}_max_layer_mean_change_nats"] = max(abs(after_means[k] - before_means[k]) for k in before_means)
        assert runs["before"][0]["code"].startswith(str(tree)) and runs["after"][0]["code"].startswith(str(ROOT))
    if memory_tokens > 0:
        for name, code in (("before", tree), ("after", ROOT)):
            out[f"memory_{name}"] = [child(code, "--memory-child", "engine", "--memory-tokens", str(memory_tokens))]
    return out


def memory_child(impl: str, tokens: int, top_k: int = 0) -> None:
    """Run in a fresh process: analyse one sample with a ``tokens``-token response; print peak RSS (GB) and time."""
    loaded = load_model("smollm2-135m-instruct", device="cpu")
    text = " ".join(m[-1]["content"] for m in (s.prompt for s in load_samples(DATA, limit=200)))
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    sample = Sample("long", "Restate these problems.", loaded.tokenizer.decode(ids))
    tokenized = [tokenize_sample(loaded.tokenizer, sample)]
    start = time.perf_counter()
    if impl == "engine":
        time_engine(loaded, tokenized, top_k=top_k)
    else:
        from reference import reference_token_table
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(loaded.hf_model.name_or_path).eval()
        del loaded
        reference_token_table(plain, None, [{"prompt": sample.prompt, "response": sample.response}], dtype=torch.float32,
                              token_ids=[tokenized[0].prompt_ids, tokenized[0].response_ids])
    seconds = time.perf_counter() - start
    print(json.dumps({"impl": impl, "response_tokens": len(tokenized[0].response_ids), "peak_rss_gb": peak_rss_gb(),
                      "seconds": seconds}))


def peak_rss_gb() -> float:
    """This process's peak resident set size. VmHWM belongs to the process image since its exec; ru_maxrss does not:
    Linux carries the parent's high-water mark across fork + exec, so a child of a big process would report the
    parent's peak."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument("--memory-tokens", type=int, default=3000, help="0 skips the memory measurement")
    parser.add_argument("--reference-memory", action="store_true", help="also measure the straightforward one (slow)")
    parser.add_argument("--before", metavar="REV", help="also time the engine of commit REV side by side with this one")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each engine with --before (the minimum counts)")
    parser.add_argument("--memory-child", choices=["engine", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--time-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--top-k", type=int, default=5, help="the predictions' k measured side by side (0: skip)")
    parser.add_argument("--top-k-only", action="store_true", help="measure only the predictions' cost and agreement")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "entropy.json")
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args.memory_tokens, args.top_k)
    if args.time_child:
        return time_child(args.time_child, args.fast)

    from reference import reference_token_table
    from transformers import AutoModelForCausalLM

    loaded = load_model("smollm2-135m-instruct", device="cpu")
    samples = make_samples(loaded, args.problems, args.response_tokens)
    tokenized = [tokenize_sample(loaded.tokenizer, s) for s in samples]
    if args.top_k_only:
        for fast in (False, True):  # warm-up: fast mode compiles its fold here, outside the timing
            time_engine(loaded, tokenized[:1], fast=fast, top_k=args.top_k)
        results = {"model": "SmolLM2-135M-Instruct", "problems": args.problems,
                   "response_tokens": sum(len(t.response_ids) for t in tokenized), "threads": torch.get_num_threads(),
                   **top_k_side_by_side(loaded, tokenized, samples, args.top_k, args.repeats, args.memory_tokens)}
        out = args.out.with_name("top_k.json") if args.out.name == "entropy.json" else args.out
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        return
    n_tokens = sum(len(t.response_ids) for t in tokenized)
    config = loaded.hf_model.config
    d, vocab, n_layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    distinct_states = 5 * n_layers + 1
    flops = n_tokens * distinct_states * 2 * d * vocab
    peak32, peak16 = peak_matmul_gflops(d, vocab, torch.float32), peak_matmul_gflops(d, vocab, torch.bfloat16)

    results = {"model": "SmolLM2-135M-Instruct", "problems": args.problems, "response_tokens": n_tokens,
               "threads": torch.get_num_threads(), "peak_gflops_float32": peak32, "peak_gflops_bfloat16": peak16}
    results["roofline_float32_s"] = flops / peak32 / 1e9
    results["roofline_bfloat16_s"] = flops / peak16 / 1e9

    time_engine(loaded, tokenized[:1])  # warm-up
    results["fast_warmup_s"] = time_engine(loaded, tokenized[:1], fast=True)  # includes fast mode's one-time compile
    results["engine_exact_s"] = time_engine(loaded, tokenized)
    results["engine_fast_s"] = time_engine(loaded, tokenized, fast=True)

    plain = AutoModelForCausalLM.from_pretrained(loaded.hf_model.name_or_path).eval()
    rows = [{"prompt": s.prompt, "response": s.response} for s in samples]
    start = time.perf_counter()
    reference = reference_token_table(plain, loaded.tokenizer, rows, dtype=torch.float32)
    results["straightforward_s"] = time.perf_counter() - start

    # accuracy of the layer means against the straightforward float32 numbers
    exact = EntropyEngine(loaded, EngineConfig()).analyse(tokenized)
    fast = EntropyEngine(loaded, EngineConfig(fast=True)).analyse(tokenized)
    ref_means = reference.groupby(["layer", "module"])[["entropy_in", "entropy_out"]].mean()
    for name, table in (("exact", exact), ("fast", fast)):
        means = table.groupby(["layer", "module"])[["entropy_in", "entropy_out"]].mean()
        results[f"{name}_max_abs_diff_nats"] = float((means - ref_means).abs().max().max())

    results["speedup_exact_vs_straightforward"] = results["straightforward_s"] / results["engine_exact_s"]
    results["speedup_fast_vs_straightforward"] = results["straightforward_s"] / results["engine_fast_s"]
    results["exact_fraction_of_float32_roofline"] = results["roofline_float32_s"] / results["engine_exact_s"]
    results["fast_fraction_of_bfloat16_roofline"] = results["roofline_bfloat16_s"] / results["engine_fast_s"]
    results["engine_exact_tokens_per_s"] = n_tokens / results["engine_exact_s"]
    results["engine_fast_tokens_per_s"] = n_tokens / results["engine_fast_s"]
    results["straightforward_tokens_per_s"] = n_tokens / results["straightforward_s"]

    for impl in (["engine"] + (["reference"] if args.reference_memory else [])) if args.memory_tokens > 0 else []:
        child = subprocess.run([sys.executable, __file__, "--memory-child", impl, "--memory-tokens", str(args.memory_tokens),
                                "--top-k", "0"], capture_output=True, text=True, check=True)
        results[f"memory_{impl}"] = json.loads(child.stdout.strip().splitlines()[-1])

    results["exact_time_over_5L+1_roofline"] = results["engine_exact_s"] / results["roofline_float32_s"]
    if args.top_k:
        results["top_k_side_by_side"] = top_k_side_by_side(loaded, tokenized, samples, args.top_k, args.repeats,
                                                           args.memory_tokens)
    if args.before:
        results["side_by_side"] = side_by_side(args.before, samples, args.repeats, args.memory_tokens)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
