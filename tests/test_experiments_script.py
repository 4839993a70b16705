"""figures/experiments.py renders the Results page's paper-ratio tables from experiments.json's numbers."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location("experiments", Path(__file__).parents[1] / "figures" / "experiments.py")
experiments = importlib.util.module_from_spec(spec)
spec.loader.exec_module(experiments)


def test_the_paper_ratio_tables_put_each_methods_numbers_on_its_own_row_with_signed_differences():
    metrics = ["avg@64", "pass@1", "pass@4", "pass@16", "pass@64"]
    value = {"base": 0.05, "grpo": 0.7, "grpo-27": 0.65, "bupo-k5": 0.6, "bupo-k15": 0.5}  # one level per method
    methods = {n: {m: {"mean": [v + i / 1000, v - 0.1, v + 0.1], "per_seed": [v + i / 1000 - 0.01, v + i / 1000 + 0.01]}
                   for i, m in enumerate(metrics)} for n, v in value.items() if n != "base"}
    seed_test = {"sign_flip_p": 0.0625}
    differences = {f"{a} - {b}": {m: {"bootstrap": [value[a] - value[b], -0.25, 0.0125], "seed_test": seed_test}
                                  for m in metrics}
                   for a, b in [("bupo-k5", "grpo"), ("bupo-k15", "grpo"), ("grpo", "grpo-27")]}
    result = {"seeds": 2, "seed_list": [1, 3], "T": 30, "S": 3, "K": [5, 15], "n": 64, "methods": methods,
              "differences": differences, "base": {m: [0.05, 0.04, 0.06] for m in metrics}}

    lines = experiments.paper_ratio_markdown(result).splitlines()

    row = {}
    for line in lines:  # each label's first row: the means, before the per-seed table
        row.setdefault(line.split(" | ")[0].removeprefix("| "), line)
    assert row["base model"] == "| base model | " + " | ".join(["0.050 [0.040, 0.060]"] * 4) + " |"
    assert row["GRPO, T = 30"].startswith("| GRPO, T = 30 | 0.700 [0.600, 0.800] | 0.702 [")  # Avg@64, then pass@4
    assert row["GRPO, T \u2212 S = 27"].startswith("| GRPO, T \u2212 S = 27 | 0.650 [0.550, 0.750] |")
    assert row["BuPO K = 15, S = 3"].endswith("| 0.504 [0.400, 0.600] |")  # pass@64, the last column
    assert row["BuPO K = 5, S = 3 \u2212 GRPO, T = 30"].startswith(
        "| BuPO K = 5, S = 3 \u2212 GRPO, T = 30 | \u22120.100 [\u22120.250, +0.013], p = 0.0625 |")
    control = row["GRPO, T = 30 \u2212 GRPO, T \u2212 S = 27"]
    assert control.split(" | ")[1] == "+0.050 [\u22120.250, +0.013], p = 0.0625"
    assert [line.split(" | ")[0] for line in lines[2:7]] == [  # the methods in the Results page's order
        "| base model", "| GRPO, T = 30", "| GRPO, T \u2212 S = 27", "| BuPO K = 5, S = 3", "| BuPO K = 15, S = 3"]
    assert lines[-6:-4] == ["| Avg@64 / pass@64 | seed 1 | seed 3 |", "| --- | --- | --- |"]
    assert lines[-1] == "| BuPO K = 15, S = 3 | 0.490 / 0.494 | 0.510 / 0.514 |"  # Avg@64 / pass@64 of each seed
    assert experiments.paper_ratio_markdown({"seeds": 0}) == ""


SUMMARY = experiments.paper_ratio_summary  # before any test replaces it


def fake_stage(tmp_path, monkeypatch):
    """The paper-ratio stage with training and evaluation replaced by records of what it asked for. A run is a folder
    of checkpoints, skipped once its last one exists (as ``train`` does); an evaluation is a problems.csv and a
    summary.json naming the checkpoint it scored."""
    kept, root, asked = tmp_path / "kept", tmp_path / "runs", []
    monkeypatch.setattr(experiments, "KEPT", kept)

    def train(runs, name, steps, seed, save_every, recipe, **bupo):
        if not (runs / name / "checkpoints" / f"step-{steps}").is_dir():
            asked.append(f"train {name}")
            for step in range(save_every, steps + 1, save_every):
                (runs / name / "checkpoints" / f"step-{step}").mkdir(parents=True, exist_ok=True)
            for file in ("run.json", "metrics.jsonl"):
                (runs / name / file).write_text("{}")
        return runs / name

    def evaluate_at_64(root, model, name):
        if not (kept / name / "problems.csv").is_file():
            asked.append(f"evaluate {name}")
            (kept / name).mkdir(parents=True, exist_ok=True)
            (kept / name / "summary.json").write_text(json.dumps({"config": {"model": [model]}}))
            (kept / name / "problems.csv").write_text(f"{model}\n")

    monkeypatch.setattr(experiments, "train", train)
    monkeypatch.setattr(experiments, "evaluate_at_64", evaluate_at_64)
    monkeypatch.setattr(experiments, "prune", lambda run, keep: None)
    monkeypatch.setattr(experiments, "paper_ratio_summary", lambda seeds: {})
    return kept, root, asked


def scored(kept: Path, name: str) -> str:
    """The checkpoint a kept fake evaluation scored, from its run folder on."""
    return "/".join(Path((kept / name / "problems.csv").read_text().strip()).parts[-3:])


def test_the_paper_ratio_stage_resumes_without_redoing_kept_work(tmp_path, monkeypatch):
    kept, runs, asked = fake_stage(tmp_path, monkeypatch)
    experiments.paper_ratio(runs, seeds=1)
    assert asked == ["train grpo-seed1", "evaluate grpo-seed1", "evaluate grpo-27-seed1", "train bupo-k5-seed1",
                     "evaluate bupo-k5-seed1", "train bupo-k15-seed1", "evaluate bupo-k15-seed1", "evaluate base"]
    asked.clear()
    experiments.paper_ratio(runs, seeds=1)
    assert asked == []  # everything kept: nothing trained or evaluated again
    (kept / "bupo-k5-seed1" / "problems.csv").unlink()  # interrupted before its evaluation was kept
    experiments.paper_ratio(runs, seeds=1)
    assert asked == ["evaluate bupo-k5-seed1"]  # the finished run is not trained again


def test_grpos_final_evaluation_and_its_control_always_come_from_one_run(tmp_path, monkeypatch):
    kept, runs, asked = fake_stage(tmp_path, monkeypatch)
    experiments.paper_ratio(runs, seeds=1)
    elsewhere = tmp_path / "elsewhere"

    # the control was kept on this machine only: the final evaluation kept with it is of another run than elsewhere's
    shutil.rmtree(kept / "grpo-seed1")
    asked.clear()
    experiments.paper_ratio(elsewhere, seeds=1)
    assert asked == ["train grpo-seed1", "evaluate grpo-seed1", "evaluate grpo-27-seed1"]
    assert {scored(kept, n) for n in ("grpo-seed1", "grpo-27-seed1")} == {"grpo-seed1/checkpoints/step-30",
                                                                         "grpo-seed1/checkpoints/step-27"}
    assert all(str(elsewhere) in (kept / n / "problems.csv").read_text() for n in ("grpo-seed1", "grpo-27-seed1"))

    # back on the first machine, whose run is another one than the kept evaluations' (elsewhere's): both redone here
    shutil.rmtree(kept / "grpo-27-seed1")
    asked.clear()
    experiments.paper_ratio(runs, seeds=1)
    assert asked == ["evaluate grpo-seed1", "evaluate grpo-27-seed1"]
    assert all(str(runs) in (kept / n / "problems.csv").read_text() for n in ("grpo-seed1", "grpo-27-seed1"))

    # the same run, its control's checkpoint pruned: trained again (else nothing could evaluate step 27)
    shutil.rmtree(kept / "grpo-27-seed1")
    shutil.rmtree(runs / "paper-ratio" / "grpo-seed1" / "checkpoints" / "step-27")
    asked.clear()
    experiments.paper_ratio(runs, seeds=1)
    assert asked == ["train grpo-seed1", "evaluate grpo-seed1", "evaluate grpo-27-seed1"]

    # the same run with both checkpoints: the kept final evaluation is this run's, so only the control is made
    shutil.rmtree(kept / "grpo-27-seed1")
    asked.clear()
    experiments.paper_ratio(runs, seeds=1)
    assert asked == ["evaluate grpo-27-seed1"]


def test_the_paper_ratio_stage_refuses_to_add_to_results_kept_under_another_protocol(tmp_path, monkeypatch):
    kept, runs, asked = fake_stage(tmp_path, monkeypatch)
    experiments.check_protocol(None)
    assert not kept.exists()  # the summary only reads: it records no protocol
    experiments.paper_ratio(runs, seeds=1)
    asked.clear()
    monkeypatch.setitem(experiments.PAPER_RATIO, "n", 32)
    with pytest.raises(SystemExit, match=r"made with paper_ratio.n 64 \(now 32\) \(protocol.json\); adding"):
        experiments.paper_ratio(runs, seeds=2)
    with pytest.raises(SystemExit, match=r"paper_ratio.n 64 \(now 32\)"):
        SUMMARY(2)
    monkeypatch.setitem(experiments.PAPER_RATIO, "n", 64)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine: dtype "auto" is bfloat16 there
    with pytest.raises(SystemExit, match=r"made with device \"cpu\" \(now \"cuda\"\).*CUDA_VISIBLE_DEVICES="):
        experiments.paper_ratio(runs, seeds=2)
    (kept / "protocol.json").unlink()
    with pytest.raises(SystemExit, match=r"have no protocol.json, so how they were made is unknown"):
        experiments.paper_ratio(runs, seeds=2)
    assert asked == []


def test_keeping_writes_the_file_that_means_done_last(tmp_path, monkeypatch):
    source = tmp_path / "run"
    source.mkdir()
    for file in ("run.json", "metrics.jsonl"):
        (source / file).write_text(file)
    copy = shutil.copy

    def copy_but_fail_on_the_last(src, dst):
        if Path(src).name == "metrics.jsonl":
            raise OSError("disk full")
        return copy(src, dst)

    monkeypatch.setattr(shutil, "copy", copy_but_fail_on_the_last)
    with pytest.raises(OSError):
        experiments.keep(source, tmp_path / "kept", ["run.json", "metrics.jsonl"])
    assert (tmp_path / "kept" / "run.json").is_file() and not (tmp_path / "kept" / "metrics.jsonl").exists()


def test_the_pass_at_k_figure_draws_each_methods_numbers_and_the_paired_differences_around_zero(monkeypatch):
    metrics = ["avg@64", "pass@1", "pass@4", "pass@16", "pass@64"]
    level = {"grpo": 0.7, "grpo-27": 0.65, "bupo-k5": 0.6, "bupo-k15": 0.5}
    methods = {n: {m: {"mean": [v + i / 100, v - 0.1, v + 0.1]} for i, m in enumerate(metrics)}
               for n, v in level.items()}
    differences = {f"bupo-k{k} - grpo": {m: {"bootstrap": [-k / 100, -0.3, 0.2]} for m in metrics} for k in (5, 15)}
    result = {"seeds": 2, "seeds_planned": 5, "complete": False, "T": 30, "S": 3, "K": [5, 15], "n": 64,
              "task": "add-sub-2x1", "held_out_problems": 100, "methods": methods, "differences": differences,
              "base": {m: [0.05, 0.04, 0.06] for m in metrics}}
    drawn = {}
    monkeypatch.setattr("internal_policy.figures.save_figure", lambda fig, path, formats: drawn.setdefault("fig", fig))
    experiments.paper_ratio_figures(result, Path("unused"))
    left, right = drawn["fig"].axes
    lines = {line.get_label(): line for line in left.get_lines()}
    assert list(lines["BuPO K = 15, S = 3"].get_ydata()) == pytest.approx([0.51, 0.52, 0.53, 0.54])  # pass@1 … @64
    assert lines["GRPO, T \u2212 S = 27"].get_linestyle() == "--"  # visible on GRPO's line
    differences = {line.get_label(): line for line in right.get_lines()}
    assert list(differences["BuPO K = 5, S = 3 \u2212 GRPO"].get_ydata()) == pytest.approx([-0.05] * 4)
    assert any(list(line.get_ydata()) == [0, 0] for line in right.get_lines())  # the zero line the bands cross
    assert "2 seeds of 5 (interim); bands: 95 % bootstrap" in drawn["fig"]._suptitle.get_text()


def test_the_dynamics_stage_keeps_its_tables_and_draws_again_from_them_without_a_run(tmp_path, monkeypatch):
    kept, runs, asked = fake_stage(tmp_path, monkeypatch)

    def compare(models, out, **options):
        asked.append(f"analyse {Path(models[0]).name} {options['norm_mode']}")
        Path(out).mkdir(parents=True)
        for table in ("summary.csv", "refinement.csv"):
            (Path(out) / table).write_text(f"{table} of {Path(models[0]).name} in mode {options['norm_mode']}\n")

    drawn = []
    monkeypatch.setattr(experiments.ip, "compare", compare)
    monkeypatch.setattr(experiments.ip, "figures_from_results", lambda folders, out: drawn.append(folders) or [])
    first = experiments.paper_ratio_dynamics(runs, tmp_path / "figures")
    assert asked == [f"{step} {name}-seed1{mode}" for name in ("grpo", "bupo-k5", "bupo-k15")
                     for step, mode in (("train", ""), ("analyse", " none"), ("analyse", " final"))]
    table = kept / "dynamics" / "dyn-bupo-k15-final" / "summary.csv"
    assert table.read_text() == "summary.csv of bupo-k15-seed1 in mode final\n"

    asked.clear()
    shutil.rmtree(runs)  # a fresh clone: no run, no analysis, only the kept tables
    assert experiments.paper_ratio_dynamics(runs, tmp_path / "figures") == first and asked == []
    assert drawn[-1] == [kept / "dynamics" / f"dyn-{name}-none" for name in ("grpo", "bupo-k5", "bupo-k15")]

    (kept / "dynamics" / "dyn-bupo-k5-final" / "summary.csv").unlink()  # one table lost: that run alone is redone
    experiments.paper_ratio_dynamics(runs, tmp_path / "figures")
    assert asked == ["train bupo-k5-seed1", "analyse bupo-k5-seed1 none", "analyse bupo-k5-seed1 final"]

    experiments.paper_ratio(runs, seeds=1)  # seed 1 complete; seed 2 only begun: its run is no training curve yet
    (kept / "grpo-seed2").mkdir()
    (kept / "grpo-seed2" / "problems.csv").write_text("")
    experiments.paper_ratio_dynamics(runs, tmp_path / "figures")
    assert drawn[-1][3:] == [kept / f"{name}-seed1" for name in ("grpo", "bupo-k5", "bupo-k15")]
