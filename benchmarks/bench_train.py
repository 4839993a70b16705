"""Trainer benchmark: ipolicy's GRPO step against TRL's GRPOTrainer, and BuPO's internal vs full step time.

    python benchmarks/bench_train.py [--steps 5] [--trl-steps 4]      # TRL: pip install trl==1.16.0

Same settings on both sides: SmolLM2-135M-Instruct in float32 on the CPU, the built-in arithmetic prompts (chat
messages), 4 prompts x 8 responses x at most 48 new tokens per step, temperature 1, top-p 1, no top-k, lr 1e-6, no KL,
eps 0.2, one PPO epoch, token-mean loss over the batch, the math reward. Median step times, side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internal_policy.data import load_samples  # noqa: E402
from internal_policy.rl.rewards import MathReward  # noqa: E402
from internal_policy.rl.trainer import TrainConfig, Trainer  # noqa: E402

PROMPTS, GROUP, NEW_TOKENS, LR = 4, 8, 48, 1e-6


def ipolicy_steps(steps: int, **extra) -> list[dict]:
    config = TrainConfig(model="smollm2-135m-instruct", data="arithmetic", limit=64, steps=steps,
                         prompts_per_step=PROMPTS, group_size=GROUP, max_new_tokens=NEW_TOKENS, lr=LR,
                         micro_batch_size=PROMPTS * GROUP, save_every=10_000, dtype="float32", device="cpu", reward="math",
                         **extra)
    with tempfile.TemporaryDirectory() as out:
        return Trainer(config, Path(out)).run(progress=False)


def trl_step_seconds(steps: int) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from internal_policy.models import embedded_gguf_path, gguf_as_folder

    folder = gguf_as_folder(embedded_gguf_path("smollm2-135m-instruct"))
    samples = load_samples("arithmetic", limit=64)
    dataset = Dataset.from_list([{"prompt": s.prompt, "answer": s.answer} for s in samples])
    math_reward = MathReward()

    def reward(completions, answer, **kwargs):
        return [math_reward("", c[0]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)]

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,
            num_generations=GROUP, max_completion_length=NEW_TOKENS, learning_rate=LR, beta=0.0, temperature=1.0,
            top_p=1.0, top_k=0, num_iterations=1, epsilon=0.2, loss_type="dapo", scale_rewards="group",
            max_steps=steps, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
            disable_dropout=True, seed=0,
        )
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=AutoTokenizer.from_pretrained(folder), callbacks=[Timer()])
        trainer.train()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--trl-steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train.json")
    args = parser.parse_args()
    results = {"threads": torch.get_num_threads(), "prompts": PROMPTS, "group": GROUP, "max_new_tokens": NEW_TOKENS}

    grpo = ipolicy_steps(args.steps)
    results["ipolicy_grpo_step_s"] = [r["step_seconds"] for r in grpo]
    results["ipolicy_grpo_median_s"] = statistics.median(results["ipolicy_grpo_step_s"])
    results["ipolicy_grpo_update_median_s"] = statistics.median(r["step_seconds"] - r["rollout_seconds"] for r in grpo)
    results["ipolicy_response_len_mean"] = statistics.mean(r["response_len_mean"] for r in grpo)

    bupo = ipolicy_steps(2 * args.steps, internal_layer=6, internal_steps=args.steps)
    for phase in ("internal", "full"):
        rows = [r for r in bupo if r["phase"] == phase]
        results[f"bupo_{phase}_update_median_s"] = statistics.median(r["step_seconds"] - r["rollout_seconds"] for r in rows)
        results[f"bupo_{phase}_step_median_s"] = statistics.median(r["step_seconds"] for r in rows)
    results["bupo_internal_vs_full_update_ratio"] = results["bupo_internal_update_median_s"] / results["bupo_full_update_median_s"]

    try:
        trl = trl_step_seconds(args.trl_steps)
        results["trl_step_s"] = trl
        results["trl_median_s"] = statistics.median(trl)
        results["ipolicy_vs_trl_median_ratio"] = results["ipolicy_grpo_median_s"] / results["trl_median_s"]
    except ImportError:
        results["trl"] = "not installed (pip install trl==1.16.0)"

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for key, value in results.items():
        print(f"{key:<36} {value}")


if __name__ == "__main__":
    main()
