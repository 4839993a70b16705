"""The headline command at its real shape: `ipolicy entropy --model Qwen/Qwen3-4B`, rehearsed on a local folder holding
Qwen3-4B's exact configuration (36 layers, hidden 2560, FFN 9728, 32 heads of 128 with 8 key/value heads, vocabulary
151 936, tied embeddings, RMSNorm eps 1e-6) with random bf16 weights and SmolLM2's tokenizer (its ids fit the
vocabulary). Nothing is downloaded.

    python benchmarks/bench_qwen3_4b_shape.py [--tokens 64] [--folder runs/qwen3-4b-shape]

Runs `ipolicy entropy` in bf16 weights: once generating a response of --tokens tokens to a built-in arithmetic prompt
(the command as users run it; a random model also samples ids beyond the tokenizer's 49 152, which decode to nothing,
so fewer tokens are analysed), then once per mode (exact, --fast) on a given response of exactly --tokens tokens (a
MATH-500 problem's text). Records each process's wall time, the manifest's generate/load/analyse times, the peak RSS
(wait4) and the time the analysis would take on one GPU predicted from its FLOP count. Writes
benchmarks/results/qwen3_4b_shape.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
              num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, rms_norm_eps=1e-6,
              max_position_embeddings=40960, rope_theta=1_000_000.0)
# One NVIDIA H200 (SXM), dense peak rates: FP32 on CUDA cores (exact mode's unembedding: torch leaves TF32 off for
# matmuls by default) and BF16 on tensor cores (the forward, and --fast's unembedding).
GPU = {"name": "NVIDIA H200 SXM", "fp32_tflops": 67.0, "bf16_tflops": 989.0}


def build(folder: Path) -> Path:
    """The random-weight Qwen3-4B-shaped folder (about 8 GB of bf16 safetensors), made once."""
    if (folder / "model.safetensors.index.json").is_file() or (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    from internal_policy.models import embedded_gguf_path, gguf_as_folder

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**CONFIG), dtype=torch.bfloat16)
    staging = folder.with_name(folder.name + ".staging")
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(gguf_as_folder(embedded_gguf_path("smollm2-135m-instruct"))).save_pretrained(staging)
    staging.rename(folder)
    return folder


def given_response(folder: Path, tokens: int) -> Path:
    """A one-row data file: a short prompt and a response of exactly ``tokens`` tokens of the model's tokenizer."""
    from transformers import AutoTokenizer

    from internal_policy.data import load_samples

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = " ".join(s.prompt[-1]["content"] for s in load_samples("math500", limit=20))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for n in range(tokens, len(ids)):  # decode, re-encode: the first cut that tokenizes back to exactly `tokens`
        response = tokenizer.decode(ids[:n])
        if len(tokenizer(response, add_special_tokens=False)["input_ids"]) == tokens:
            break
    path = folder.with_name("qwen3-4b-shape-response.jsonl")
    path.write_text(json.dumps({"prompt": "Restate the problems.", "response": response}) + "\n")
    return path


def run(folder: Path, out: Path, tokens: int, fast: bool, data: Path | None = None) -> dict:
    """One `ipolicy entropy` process (generating, or on the given ``data``); its wall time, peak RSS and timings."""
    source = ["--data", str(data)] if data else ["--data", "arithmetic", "--limit", "1", "--max-new-tokens", str(tokens)]
    command = [str(Path(sys.executable).with_name("ipolicy")), "entropy", "--model", str(folder), "--dtype", "bfloat16",
               *source, "--out", str(out), "--overwrite", "-q", *(["--fast"] if fast else [])]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    output = process.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"ipolicy entropy failed:\n{output}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"wall_s": seconds, "peak_rss_gb": usage.ru_maxrss / 1e6, "timings": manifest["timings"],
            "n_tokens": manifest["n_tokens"], "boundary_layer": manifest["boundary_layer"]}


def flops(n_tokens: int, prompt_tokens: int) -> dict:
    """The analysis's floating-point operations: the forward over prompt and response (2 x parameters per token) and
    the unembedding of the 5L + 1 distinct states of each analysed token (2 d V each)."""
    d, v, layers, f = CONFIG["hidden_size"], CONFIG["vocab_size"], CONFIG["num_hidden_layers"], CONFIG["intermediate_size"]
    heads, kv, head_dim = CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"], CONFIG["head_dim"]
    per_layer = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * f  # q, o; k, v; gate, up, down
    parameters = layers * per_layer + v * d
    return {"forward": 2 * parameters * (prompt_tokens + n_tokens), "unembedding": (5 * layers + 1) * n_tokens * 2 * d * v,
            "parameters": parameters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--folder", type=Path, default=ROOT / "runs" / "qwen3-4b-shape")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "qwen3_4b_shape.json")
    args = parser.parse_args()
    started = time.perf_counter()
    folder = build(args.folder)
    results = {"config": CONFIG, "tokens_asked": args.tokens, "build_s": time.perf_counter() - started,
               "threads": os.cpu_count(), "gpu": GPU}
    results["generating"] = run(folder, args.folder.with_name("qwen3-4b-shape-generate"), args.tokens, False)
    data = given_response(folder, args.tokens)
    for mode in ("exact", "fast"):
        results[mode] = run(folder, args.folder.with_name(f"qwen3-4b-shape-{mode}"), args.tokens, mode == "fast", data)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = len(tokenizer("Restate the problems.", add_special_tokens=False)["input_ids"])
    count = flops(results["exact"]["n_tokens"], prompt)
    results["flops"] = count
    results["gpu_predicted_s"] = {  # at the peak rates: a lower bound
        "exact": count["forward"] / (GPU["bf16_tflops"] * 1e12) + count["unembedding"] / (GPU["fp32_tflops"] * 1e12),
        "fast": (count["forward"] + count["unembedding"]) / (GPU["bf16_tflops"] * 1e12)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
