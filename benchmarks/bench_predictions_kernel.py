"""What predictions cost in the unembedding kernel alone, measured steadier than the whole engine can be on a shared
machine: ``PolicyHead.entropy`` against ``PolicyHead.predictions`` (k = 5) on real states, alternating in one process,
and the eager block operations they are built from, side by side.

    python benchmarks/bench_predictions_kernel.py [--before REV] [--repeats 10] [--rows 6144]

The states are SmolLM2-135M-Instruct's own (every state the engine reads for one MATH-500 sample of 128 sampled tokens,
norm mode none). ``--before REV`` also times ``internal_policy/lens/policy.py`` of commit REV on them, and checks that
both give identical predictions. Writes ``benchmarks/results/predictions_kernel.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from internal_policy.lens import policy  # noqa: E402


def engine_states(rows: int) -> tuple[Tensor, Tensor, nn.Linear]:
    """The first ``rows`` states (prepared) and targets the engine hands its head, and the model's unembedding."""
    from bench_entropy import make_samples, time_engine
    from internal_policy.data import tokenize_sample
    from internal_policy.models import load_model

    loaded = load_model("smollm2-135m-instruct", device="cpu")
    tokenized = [tokenize_sample(loaded.tokenizer, s) for s in make_samples(loaded, 1, 128)]
    seen, original = [], policy.PolicyHead.predictions

    def record(self, states, targets, top_k):
        seen.append((self.prepare(states).detach().clone(), targets.clone()))
        return original(self, states, targets, top_k)

    policy.PolicyHead.predictions = record
    try:
        time_engine(loaded, tokenized, top_k=5)
    finally:
        policy.PolicyHead.predictions = original
    states, targets = torch.cat([s for s, _ in seen])[:rows], torch.cat([t for _, t in seen])[:rows]
    weight = loaded.hf_model.lm_head.weight.detach().float()
    unembed = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    unembed.weight.data = weight
    return states, targets, unembed


def policy_of(rev: str):
    """``internal_policy/lens/policy.py`` of commit ``rev``, imported as its own module."""
    source = subprocess.run(["git", "show", f"{rev}:internal_policy/lens/policy.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "policy_before.py"
    path.write_text(source.replace("from ..config import NORM_MODES", "from internal_policy.config import NORM_MODES"))
    spec = importlib.util.spec_from_file_location("policy_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["policy_before"] = module
    spec.loader.exec_module(module)
    return module


def timed(function, repeats: int = 200) -> float:
    """Milliseconds per call, after a warm-up."""
    for _ in range(10):
        function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats * 1e3


def block_operations() -> dict:
    """The eager operations on one [512, 4096] float32 block (the engine's default), in ms per call."""
    torch.manual_seed(0)
    z = torch.randn(512, 4096) * 3
    threshold, scratch = z[:, 100].clone(), torch.empty_like(z)

    def sign_bit_count():
        difference = torch.sub(z, threshold[:, None], out=scratch)
        return difference.view(torch.int32).bitwise_right_shift_(31).sum(-1, dtype=torch.int32)

    out = {
        "count_by_float_ge_and_sum": timed(lambda: torch.ge(z, threshold[:, None], out=scratch).sum(-1)),
        "count_by_sign_bit_of_difference": timed(sign_bit_count),
        "count_by_bool_mask_sum": timed(lambda: (z >= threshold[:, None]).sum(-1)),
        "read_pass_amax": timed(lambda: z.amax(-1)),
    }
    for width in (64, 128):
        maxima = z.view(512, -1, width).amax(-1)
        chosen = torch.topk(maxima, 5, dim=-1).indices
        groups = z.view(512, -1, width)
        rows = torch.arange(512)[:, None] * groups.shape[1]
        out[f"topk_6_of_{groups.shape[1]}_group_maxima"] = timed(lambda: torch.topk(maxima, 6, dim=-1))
        out[f"gather_5_groups_of_{width}"] = timed(lambda: groups.gather(1, chosen[:, :, None].expand(-1, -1, width)))
        out[f"index_select_5_groups_of_{width}"] = timed(
            lambda: groups.reshape(-1, width).index_select(0, (rows + chosen).flatten()))
    return {name: round(ms, 3) for name, ms in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", metavar="REV", help="also time the head of commit REV")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rows", type=int, default=6144)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "predictions_kernel.json")
    args = parser.parse_args()

    states, targets, unembed = engine_states(args.rows)
    heads = {"entropy": policy.PolicyHead(unembed), "predictions": policy.PolicyHead(unembed)}
    runs = {"entropy": lambda: heads["entropy"].entropy(states),
            "predictions": lambda: heads["predictions"].predictions(states, targets, 5)}
    if args.before:
        heads["predictions_before"] = policy_of(args.before).PolicyHead(unembed)
        runs["predictions_before"] = lambda: heads["predictions_before"].predictions(states, targets, 5)
        now, before = runs["predictions"](), runs["predictions_before"]()
        for name in ("entropy", "top_ids", "top_probs", "token_prob", "token_rank"):
            assert torch.equal(getattr(now, name), getattr(before, name)), f"{name} differs from {args.before}'s"
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    ratios = {name: {"fastest": min(seconds[name]) / min(seconds["entropy"]),
                     "median_pair": float(torch.tensor(seconds[name]).div(torch.tensor(seconds["entropy"])).median())}
              for name in runs if name != "entropy"}
    results = {"model": "SmolLM2-135M-Instruct", "rows": len(states), "threads": torch.get_num_threads(),
               "before": args.before, "seconds": seconds, "slowdown_over_entropy": ratios,
               "block_operations_ms": block_operations()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"slowdown_over_entropy": ratios, "block_operations_ms": results["block_operations_ms"]}, indent=2))


if __name__ == "__main__":
    main()
