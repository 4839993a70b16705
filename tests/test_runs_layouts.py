"""The runs researchers already have, each built by the tool that writes it where it installs here: TRL's GRPOTrainer
(full weights and LoRA), PEFT's save_pretrained, verl's layout as documented, Hub revisions, folders of numbered
model folders. Each is recognised with its steps in order, its checkpoints give the numbers of the same weights as a
plain folder, and nothing in them that is a pickle is ever unpickled."""

import json
import pickle
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import internal_policy as ip
import internal_policy.entropy_run as entropy_run
from cli_helpers import run_cli
from internal_policy.runs import checkpoint_series

PICKLES = ("optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin")


class Payload:
    """A pickle that, when unpickled, creates the file ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(folder: Path, names, marker: Path) -> None:
    for name in names:
        (folder / name).write_bytes(pickle.dumps({"state": Payload(marker)}))


def trl_run(model: Path, out: Path, lora: bool) -> Path:
    """Two GRPO steps of TRL's GRPOTrainer with a checkpoint every step (full weights, or a LoRA adapter)."""
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
    from datasets import Dataset

    peft_config = None
    if lora:
        from peft import LoraConfig

        # random B (not the zero init): the adapter changes the model from its first step, whatever the gradient
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                 init_lora_weights=False)
    args = trl.GRPOConfig(output_dir=str(out), per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
                          max_steps=2, save_steps=1, report_to=[], use_cpu=True, logging_steps=1, learning_rate=1e-2,
                          bf16=False, seed=0)
    data = Dataset.from_list([{"prompt": f"What is {a} + 1?"} for a in range(8)])
    digits = lambda completions, **kw: [float(sum(c.isdigit() for c in x)) for x in completions]  # noqa: E731
    trl.GRPOTrainer(model=str(model), reward_funcs=digits, args=args, train_dataset=data, peft_config=peft_config,
                    processing_class=AutoTokenizer.from_pretrained(model)).train()
    return out


@pytest.fixture(scope="module")
def trl_full(tiny_llama, tmp_path_factory):
    return trl_run(tiny_llama, tmp_path_factory.mktemp("trl") / "full", lora=False)


@pytest.fixture(scope="module")
def trl_lora(tiny_llama, tmp_path_factory):
    return trl_run(tiny_llama, tmp_path_factory.mktemp("trl") / "lora", lora=True)


def summaries_equal(a: pd.DataFrame, b: pd.DataFrame, atol: float = 1e-4) -> bool:
    keys = ["layer", "module"]
    a, b = a.sort_values(keys).reset_index(drop=True), b.sort_values(keys).reset_index(drop=True)
    return all((a[c] - b[c]).abs().max() < atol for c in ("entropy_in_mean", "entropy_out_mean", "delta_mean"))


def test_a_trl_run_with_full_weights_is_a_series(trl_full, rows_file, tmp_path):
    series = checkpoint_series(str(trl_full))
    assert series.layout == "trainer-output" and [c.step for c in series.checkpoints] == [1, 2]
    out = tmp_path / "e"
    assert run_cli("entropy", "--run", trl_full, "-d", rows_file, "-o", out, "-q").exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["series"] == ["trainer-output"] and [m["step"] for m in manifest["models"]] == [1, 2]
    plain = ip.analyse(model=str(trl_full / "checkpoint-2"), data=str(rows_file))
    last = pd.read_csv(out / "summary.csv").query("step == 2")
    assert summaries_equal(last, plain.summary)
    # the same folder for eval and figures: every checkpoint evaluated, TRL's own log drawn
    assert run_cli("eval", "-m", trl_full, "-d", "add-sub-1:test", "--n", "1", "--limit", "2", "--max-new-tokens", "2",
                   "-o", tmp_path / "eval", "-q").exit_code == 0
    assert len(pd.read_csv(tmp_path / "eval" / "summary.csv")) == 2
    figures = run_cli("figures", trl_full, out, "-o", tmp_path / "fig")
    assert figures.exit_code == 0 and (tmp_path / "fig" / "training_curves.png").is_file()


def test_a_trl_output_folder_that_also_holds_the_final_model_is_still_a_series(trl_full, tmp_path):
    out = tmp_path / "output"
    shutil.copytree(trl_full, out)
    for file in (out / "checkpoint-2").glob("*.json"):  # trainer.save_model(output_dir) after training
        shutil.copy(file, out / file.name)
    shutil.copy(out / "checkpoint-2" / "model.safetensors", out / "model.safetensors")
    series = checkpoint_series(str(out))
    assert series.layout == "trainer-output" and [c.step for c in series.checkpoints] == [1, 2]


def test_a_lora_run_loads_through_peft_and_equals_the_merged_model(trl_lora, tiny_llama, rows_file, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel

    series = checkpoint_series(str(trl_lora))
    assert [c.step for c in series.checkpoints] == [0, 1, 2]  # the adapters' base model is step 0
    assert series.checkpoints[0].model == str(tiny_llama) and series.checkpoints[2].base_model == str(tiny_llama)
    merged = tmp_path / "merged"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), trl_lora / "checkpoint-2")
    model.merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(merged)
    result = ip.compare([str(trl_lora)], data=str(rows_file), out=tmp_path / "e")
    plain = ip.analyse(model=str(merged), data=str(rows_file))
    assert summaries_equal(result.summary.query("step == 2"), plain.summary)
    base = ip.analyse(model=str(tiny_llama), data=str(rows_file))
    assert summaries_equal(result.summary.query("step == 0"), base.summary)
    assert not summaries_equal(plain.summary, base.summary, atol=1e-6)  # the adapter changed the model


def test_a_peft_adapter_folder_without_its_base_asks_for_it(tiny_llama, rows_file, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    refused = run_cli("entropy", "-m", tmp_path / "adapter", "-d", rows_file, "-o", tmp_path / "x", "-q")
    assert refused.exit_code == 2 and "--base-model" in refused.output and not (tmp_path / "x").exists()
    done = run_cli("entropy", "-m", tmp_path / "adapter", "--base-model", tiny_llama, "-d", rows_file, "-o",
                   tmp_path / "y", "-q")
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "y" / "manifest.json").read_text())["model_source"] == "adapter"


def verl_experiment(tiny_llama: Path, root: Path, steps=(1, 2), merged=True) -> Path:
    """checkpoints/PROJECT/EXPERIMENT/global_step_N/actor/ as verl writes it: FSDP shards (pickles), and in
    huggingface/ the config and tokenizer, with the weights when the run saved `hf_model`."""
    experiment = root / "checkpoints" / "project" / "experiment"
    for step in steps:
        actor = experiment / f"global_step_{step}" / "actor"
        (actor / "huggingface").mkdir(parents=True)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        with torch.no_grad():
            model.lm_head.weight.mul_(1 + 0.1 * step)
        model.save_pretrained(actor / "huggingface")
        if not merged:
            for weights in (actor / "huggingface").glob("*.safetensors"):
                weights.unlink()
        AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(actor / "huggingface")
        plant(actor, ["model_world_size_1_rank_0.pt", "optim_world_size_1_rank_0.pt",
                      "extra_state_world_size_1_rank_0.pt"], root / "pwned")
    (experiment / "latest_checkpointed_iteration.txt").write_text(str(max(steps)))
    return experiment


def test_a_verl_experiment_is_a_series_and_shards_alone_are_refused_with_the_merger(tiny_llama, rows_file, tmp_path):
    experiment = verl_experiment(tiny_llama, tmp_path, steps=(10, 2))
    series = checkpoint_series(str(experiment), base_model=str(tiny_llama))
    assert series.layout == "verl" and [c.step for c in series.checkpoints] == [0, 2, 10]
    result = ip.compare([str(experiment)], data=str(rows_file), base_model=str(tiny_llama))
    plain = ip.analyse(model=str(experiment / "global_step_10" / "actor" / "huggingface"), data=str(rows_file),
                       out=tmp_path / "plain")
    assert summaries_equal(result.summary.query("step == 10"), plain.summary)
    assert not (tmp_path / "pwned").exists()
    shards_only = verl_experiment(tiny_llama, tmp_path / "unmerged", steps=(3,), merged=False)
    refused = run_cli("entropy", "--run", shards_only, "-d", rows_file, "-o", tmp_path / "x", "-q")
    line = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "model_world_size_1_rank_0.pt" in line
    assert "python -m verl.model_merger merge --backend fsdp --local_dir" in line and not (tmp_path / "x").exists()
    figures = run_cli("figures", tmp_path / "plain", experiment, "-o", tmp_path / "fig")
    assert figures.exit_code == 2 and "ipolicy entropy --run" in " ".join(figures.output.split())
    assert not (tmp_path / "fig").exists()  # refused before the first result's figures were drawn
    project = run_cli("entropy", "--run", experiment.parent, "-d", rows_file, "-o", tmp_path / "y", "-q")
    assert project.exit_code == 2 and "verl project folder" in project.output and "experiment" in project.output


def test_hub_revisions_are_checkpoints_in_step_order(tiny_llama, tmp_path, monkeypatch):
    import huggingface_hub

    branches = [type("Ref", (), {"name": n})() for n in ("main", "step2000", "step1000", "step300")]
    monkeypatch.setattr(huggingface_hub, "list_repo_refs",
                        lambda repo: type("Refs", (), {"branches": branches})())
    series = checkpoint_series("EleutherAI/pythia-14m", revisions="step*")
    assert [(c.step, c.revision) for c in series.checkpoints] == [(300, "step300"), (1000, "step1000"), (2000, "step2000")]
    assert [c.revision for c in checkpoint_series("org/m", revisions="step2000,step1000").checkpoints] == ["step1000", "step2000"]
    with pytest.raises(ip.IPolicyError, match="step number"):
        checkpoint_series("org/m", revisions="main")
    # each revision is loaded as itself (here a local copy stands in for the Hub's)
    loads = []
    real = entropy_run.load_model
    monkeypatch.setattr(entropy_run, "load_model",
                        lambda model, **kw: loads.append((model, kw["revision"])) or real(str(tiny_llama), **{**kw, "revision": None}))
    samples = [ip.Sample(id="a", prompt="hello world", response="the lazy dog")]
    result = ip.compare(["EleutherAI/pythia-14m"], revisions="step1000,step300", samples=samples)
    assert loads == [("EleutherAI/pythia-14m", "step300"), ("EleutherAI/pythia-14m", "step1000")]
    assert sorted(result.summary["step"].unique()) == [300, 1000]


def test_a_folder_of_numbered_model_folders_is_a_series(tiny_llama, tiny_qwen3, rows_file, tmp_path):
    root = tmp_path / "ckpts"
    shutil.copytree(tiny_llama, root / "iter_0100")
    shutil.copytree(tiny_llama, root / "iter_0050")
    (root / "notes").mkdir()
    series = checkpoint_series(str(root))
    assert series.layout == "numbered-folders" and [c.step for c in series.checkpoints] == [50, 100]
    shutil.copytree(tiny_qwen3, root / "qwen3-0.6b")  # a folder of different models is not a run
    refused = run_cli("entropy", "--run", root, "-d", rows_file, "-o", tmp_path / "x", "-q")
    assert refused.exit_code == 2 and "different architectures" in refused.output and "--model A" in refused.output


def test_nothing_in_a_run_folder_is_unpickled(trl_full, tiny_llama, rows_file, tmp_path):
    """TRL checkpoints carry optimizer.pt, rng_state.pth, scheduler.pt, training_args.bin (pickles): analysing,
    evaluating and drawing the run opens none. A weights file that is itself a pickle with code is refused."""
    run = tmp_path / "run"
    shutil.copytree(trl_full, run)
    marker = tmp_path / "pwned"
    for checkpoint in run.glob("checkpoint-*"):
        plant(checkpoint, PICKLES, marker)
    assert run_cli("entropy", "--run", run, "-d", rows_file, "-o", tmp_path / "e", "-q").exit_code == 0
    assert run_cli("eval", "-m", run, "-d", "add-sub-1:test", "--n", "1", "--limit", "1", "--max-new-tokens", "2",
                   "-o", tmp_path / "v", "-q").exit_code == 0
    assert run_cli("figures", run, "-o", tmp_path / "f").exit_code == 0
    assert not marker.exists()
    # weights as a .bin pickle that runs code: transformers loads .bin with weights_only, which refuses it
    hostile = tmp_path / "hostile"
    shutil.copytree(tiny_llama, hostile)
    (hostile / "model.safetensors").unlink()
    plant(hostile, ["pytorch_model.bin"], marker)
    refused = run_cli("entropy", "-m", hostile, "-d", rows_file, "-o", tmp_path / "h", "-q")
    assert refused.exit_code != 0 and not marker.exists()
