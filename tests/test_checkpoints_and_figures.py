"""Entropy across training checkpoints, feature refinement, and `ipolicy figures`."""

import json
import re
import shutil
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli_helpers import run_cli
from conftest import ROWS
from reference import reference_refinement, reference_summary

REWARD = "def fn(prompt, response, ground_truth):\n    return sum(c.isdigit() for c in response) / max(1, len(response))\n"


@pytest.fixture(scope="module")
def bupo_run(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bupo")
    (folder / "rewards.py").write_text(REWARD)
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n" for a in range(6)))
    result = run_cli("train-bupo", "--model", tiny_llama, "--data", folder / "prompts.jsonl", "--reward", f"{folder / 'rewards.py'}:fn",
                     "--steps", "3", "--internal-layer", "2", "--internal-steps", "1", "--prompts-per-step", "2",
                     "--group-size", "4", "--max-new-tokens", "8", "--lr", "1e-2", "--save-every", "1", "--out", folder / "run", "-q")
    assert result.exit_code == 0, result.output
    return folder / "run"


@pytest.fixture(scope="module")
def across_checkpoints(bupo_run, rows_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("dynamics") / "out"
    result = run_cli("entropy", "--run", bupo_run, "--data", rows_file, "--out", out, "--refine-layer", "2", "-q")
    assert result.exit_code == 0, result.output
    return out


def test_entropy_across_checkpoints_matches_reference(bupo_run, across_checkpoints):
    summary = pd.read_csv(across_checkpoints / "summary.csv")
    assert list(summary.columns[:8]) == ["layer", "module", "entropy_in_mean", "entropy_out_mean", "delta_mean",
                                         "n_tokens", "step", "checkpoint"]
    assert sorted(summary["step"].unique()) == [0, 1, 2, 3]
    last = summary[summary["step"] == 3]
    checkpoint = bupo_run / "checkpoints" / "step-3"
    reference = reference_summary(AutoModelForCausalLM.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint), ROWS)
    merged = last.merge(reference, on=["layer", "module"], suffixes=("", "_ref"))
    assert len(merged) == 12
    for column in ("entropy_in_mean", "entropy_out_mean", "delta_mean"):
        assert (merged[column] - merged[f"{column}_ref"]).abs().max() < 1e-3
    assert (merged["n_tokens"] == merged["n_tokens_ref"]).all()
    # the weights really changed between checkpoints, and every checkpoint saw the same tokens
    by_step = summary[summary.module == "layer"].pivot_table(index="layer", columns="step", values="entropy_out_mean")
    assert (by_step[3] - by_step[0]).abs().max() > 1e-3
    tokens = pd.read_parquet(across_checkpoints / "tokens.parquet", columns=["step", "sample", "position", "token_id"])
    per_step = [frame.drop(columns="step").drop_duplicates().sort_values(["sample", "position"]).reset_index(drop=True)
                for _, frame in tokens.groupby("step")]
    assert all(frame.equals(per_step[0]) for frame in per_step)


def test_feature_refinement_matches_reference(bupo_run, across_checkpoints):
    refinement = pd.read_csv(across_checkpoints / "refinement.csv")
    assert sorted(refinement["step"].unique()) == [0, 1, 2, 3] and set(refinement["layer_j"]) == {3, 4}
    checkpoint = bupo_run / "checkpoints" / "step-2"
    reference = reference_refinement(AutoModelForCausalLM.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint), ROWS, 2)
    merged = refinement[refinement.step == 2].merge(reference, on="layer_j")
    assert (merged["cos_mean"] - merged["cos_ref"]).abs().max() < 1e-4
    assert (merged["kl_mean"] - merged["kl_ref"]).abs().max() < 1e-3
    assert merged["kl_ref"].min() > 1e-3  # the divergence is real, so the check can fail


def _looks_like_a_figure(path):
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert image[..., :3].std() > 0.05  # not blank


def test_figures_command(across_checkpoints, bupo_run, tiny_llama, rows_file, tmp_path):
    evaluation = tmp_path / "eval"
    reward = f"{bupo_run.parent / 'rewards.py'}:fn"
    assert run_cli("eval", "--model", bupo_run, "--data", bupo_run.parent / "prompts.jsonl", "--reward", reward,
                   "--n", "4", "--k", "1", "--k", "2", "--k", "4", "--max-new-tokens", "4", "-o", evaluation, "-q").exit_code == 0
    assert set(pd.read_csv(evaluation / "summary.csv")["model"]) == {f"run-step-{i}" for i in range(4)}
    out = tmp_path / "figures"
    again = tmp_path / "again"
    shutil.copytree(across_checkpoints, again)
    result = run_cli("figures", across_checkpoints, again, bupo_run, evaluation, "--out", out)
    assert result.exit_code == 0, result.output
    expected = ["out_entropy_dynamics", "out_entropy_flow", "out_entropy_change", "out_refinement", "training_curves",
                "eval_pass_at_k", "entropy_dynamics_side_by_side", "internal_layer_2"]
    for name in expected:
        _looks_like_a_figure(out / f"{name}.png")
        assert (out / f"{name}.pdf").read_bytes()[:4] == b"%PDF"
    bad = run_cli("figures", tmp_path / "nothing", "--out", out)
    assert bad.exit_code == 2 and "does not exist" in bad.output
    (tmp_path / "empty").mkdir()
    bad = run_cli("figures", across_checkpoints, tmp_path / "empty", "--out", tmp_path / "new" / "figures")
    assert bad.exit_code == 2 and "holds no results" in bad.output and not (tmp_path / "new").exists()  # nothing written


def test_dynamics_figures_draw_the_measured_values(across_checkpoints):
    from internal_policy.figures import entropy_dynamics_side_by_side, internal_layer_dynamics

    summary = pd.read_csv(across_checkpoints / "summary.csv")
    later = summary.assign(entropy_out_mean=summary["entropy_out_mean"] + 1.0)  # a second result, one nat higher
    fig = internal_layer_dynamics({"a": summary, "b": later}, layer=2)
    for ax, (module, column) in zip(fig.axes, [("layer", "entropy_out_mean"), ("attn", "delta_mean"), ("ffn", "delta_mean")]):
        expected = summary[(summary.module == module) & (summary.layer == 2)].sort_values("step")
        assert list(ax.lines[0].get_xdata()) == list(expected["step"])
        assert ax.lines[0].get_ydata() == pytest.approx(expected[column].to_numpy())
    assert fig.axes[0].lines[1].get_ydata() == pytest.approx(fig.axes[0].lines[0].get_ydata() + 1.0)
    assert list(fig.axes[2].get_xticks()) == sorted(summary["step"].unique())  # a tick at each checkpoint
    grid = entropy_dynamics_side_by_side({"a": summary, "b": later})
    heatmaps = [ax.collections[0] for ax in grid.axes[:2]]  # the colour bar's axes come after the panels
    assert len(heatmaps) == 2 and heatmaps[0].get_clim() == heatmaps[1].get_clim()  # one colour scale
    layers = summary[summary.module == "layer"]
    assert heatmaps[0].get_clim() == pytest.approx((layers.entropy_out_mean.min(), layers.entropy_out_mean.max() + 1.0))


def test_training_curves_claim_a_band_over_seeds_only_where_a_method_has_several():
    from internal_policy.figures import training_curves

    def metrics(entropy: float) -> pd.DataFrame:
        return pd.DataFrame({"step": [1, 2, 3], "phase": ["internal", "full", "full"], "entropy": entropy})

    one = training_curves({"GRPO seed 1": metrics(1.0), "BuPO seed 1": metrics(2.0)})
    assert one._suptitle.get_text() == "Training curves (shaded: steps 1..S of the BuPO runs)"
    three = training_curves({f"{m} seed {s}": metrics(s + (m == "BuPO")) for m in ("GRPO", "BuPO") for s in (1, 2, 3)})
    assert three._suptitle.get_text().endswith("; bands: min–max over 3 seeds)")
    drawn = sorted(tuple(line.get_ydata()) for line in three.axes[0].get_lines() if len(line.get_ydata()) == 3)
    assert drawn == [(2.0, 2.0, 2.0), (3.0, 3.0, 3.0)]  # each method's mean over seeds 1, 2, 3
    monitored = training_curves({"GRPO seed 1": metrics(1.0).assign(internal_entropy=0.5, monitor_layer=5),
                                 "BuPO seed 1": metrics(2.0).assign(internal_entropy=0.3, monitor_layer=15)})
    legend = [text.get_text() for text in monitored.axes[-1].get_legend().get_texts()]
    assert legend == ["GRPO: k = 5", "BuPO: k = 15"]  # one axis, two layers: each line names its own


def test_a_run_folder_as_model_is_analysed_like_run(bupo_run, across_checkpoints, rows_file, tmp_path):
    out = tmp_path / "as-model"
    result = run_cli("entropy", "--model", bupo_run, "--data", rows_file, "--out", out, "--refine-layer", "2", "-q")
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), pd.read_csv(across_checkpoints / "summary.csv"))


def test_figures_go_to_a_fresh_folder_by_default(across_checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "figures").mkdir()
    result = run_cli("figures", across_checkpoints)
    assert result.exit_code == 0, result.output
    written = [line for line in result.output.splitlines() if line.endswith(".png")]
    assert written and all(line.startswith("runs/figures-") for line in written)
    assert not list((tmp_path / "figures").iterdir())  # a committed figures/ folder is never overwritten


def test_resume_never_unpickles_a_trainer_state(bupo_run, tiny_llama, tmp_path):
    """A run folder from someone else must not run code on --resume: the trainer state is safetensors + JSON, and a
    pickle (trainer_state.pt, as older versions wrote) is refused without being opened."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(bupo_run, run)
    latest = run / "checkpoints" / "step-3"
    assert (latest / "trainer_state.safetensors").is_file() and (latest / "trainer_state.json").is_file()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    for name in ("trainer_state.safetensors", "trainer_state.json"):
        (latest / name).unlink()
    (latest / "trainer_state.pt").write_bytes(pickle.dumps({"step": 3, "payload": Payload()}))
    reward = f"{bupo_run.parent / 'rewards.py'}:fn"
    result = run_cli("train-bupo", "--model", tiny_llama, "--data", bupo_run.parent / "prompts.jsonl",
                     "--reward", reward, "--steps", "4", "--internal-layer", "2", "--internal-steps", "1", "--lr", "1e-2",
                     "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "8", "--out", run, "--resume", "-q")
    assert result.exit_code == 2 and "never loaded" in result.output, result.output
    assert not marker.exists()


def test_every_output_column_is_defined_in_the_definitions_page(bupo_run, across_checkpoints, tmp_path):
    """docs/definitions.md names every column of summary.csv, tokens.parquet, refinement.csv, metrics.jsonl and the
    eval tables, and every manifest key."""
    page = (Path(__file__).parents[1] / "docs" / "definitions.md").read_text()
    evaluation = tmp_path / "eval"
    assert run_cli("eval", "--model", bupo_run / "checkpoints" / "step-3", "--data", bupo_run.parent / "prompts.jsonl",
                   "--reward", f"{bupo_run.parent / 'rewards.py'}:fn", "--n", "2", "--k", "2", "--max-new-tokens", "4",
                   "-o", evaluation, "-q").exit_code == 0
    names = set(pd.read_csv(across_checkpoints / "summary.csv").columns)
    names |= set(pd.read_parquet(across_checkpoints / "tokens.parquet").columns)
    names |= set(pd.read_csv(across_checkpoints / "refinement.csv").columns)
    names |= set(json.loads((bupo_run / "metrics.jsonl").read_text().splitlines()[0]))
    names |= set(pd.read_csv(evaluation / "problems.csv").columns) | set(pd.read_csv(evaluation / "summary.csv").columns)
    names |= set(pd.read_json(next((evaluation / "responses").glob("*.jsonl")), lines=True).columns)
    single = json.loads((across_checkpoints / "checkpoints" / "run-step-0" / "manifest.json").read_text())
    names |= set(single) | set(single["timings"]) | set(single["fingerprint"]) | set(single["fingerprint"]["model"])
    names |= set(json.loads((across_checkpoints / "manifest.json").read_text())["models"][0])
    model_folder = across_checkpoints / "checkpoints" / "run-step-0"
    names |= set(pd.read_parquet(model_folder / "predictions.parquet").columns)
    names |= set(pd.read_parquet(model_folder / "vocabulary.parquet").columns)
    names |= set(json.loads((across_checkpoints / "samples.jsonl").read_text().splitlines()[0]))
    generic = lambda n: re.sub(r"^avg@\d+$", "avg@n", re.sub(r"^pass@\d+$", "pass@k", n))  # noqa: E731
    missing = sorted(n for n in names if f"`{generic(n)}`" not in page)
    assert not missing, f"not defined in docs/definitions.md: {missing}"
