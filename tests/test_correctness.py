"""The ways a result could go silently wrong, each tried as a user would (issue 21, items 1-12): another run's numbers
from a reused folder, a changed resumed run, nulls read as text, a KL against the trained unembedding, configs that
drift, unresolved fingerprints, stale files, pooled figures, empty responses, private files, and the stop token."""

import dataclasses
import json
import os
import stat
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import internal_policy as ip
import internal_policy.entropy_run as entropy_run
import internal_policy.figures as figures_module
from cli_helpers import run_cli
from conftest import ROWS
from internal_policy.data import tokenize_sample
from internal_policy.rl.generation import complete_samples
from reference import reference_token_table
from tiny_models import save_tiny_model

REWARD = "def fn(prompt, response, ground_truth):\n    return sum(c.isdigit() for c in response) / max(1, len(response))\n"


def samples(rows, prefix="s"):
    return [ip.Sample(id=f"{prefix}{i}", **row) for i, row in enumerate(rows)]


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-mistral"), "mistral")


@pytest.fixture(scope="module")
def train_rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-rows")
    (folder / "rows.jsonl").write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n"
                                               for a in range(6)))
    (folder / "rewards.py").write_text(REWARD)
    return folder


# ---------------------------------------------------------------------------------------------------- 1, 2, 7: folders
def test_a_folder_resumes_only_the_same_samples_and_the_same_model(tiny_llama, tiny_qwen3, tmp_path):
    first = ip.analyse(model=str(tiny_llama), samples=samples(ROWS[:3]), out=tmp_path / "x")
    with pytest.raises(ip.IPolicyError, match="differs in: samples"):
        ip.analyse(model=str(tiny_llama), samples=samples(ROWS[2:]), out=tmp_path / "x")
    assert ip.EntropyResult.load(tmp_path / "x").tokens.equals(first.tokens)

    llama, qwen3 = ip.load_model(str(tiny_llama)), ip.load_model(str(tiny_qwen3))
    result = ip.analyse(loaded=llama, samples=samples(ROWS), out=tmp_path / "y")
    assert result.manifest["model"] == str(tiny_llama)  # not the default model's name
    with pytest.raises(ip.IPolicyError, match="differs in: model"):
        ip.analyse(loaded=qwen3, samples=samples(ROWS), out=tmp_path / "y")
    with pytest.raises(ip.IPolicyError, match="`model` is .* but `loaded` holds"):
        ip.analyse(model=str(tiny_llama), loaded=qwen3, samples=samples(ROWS))
    # the same model, changed in memory (a training step in a notebook), is another model
    with torch.no_grad():
        llama.hf_model.lm_head.weight.mul_(1.01)
    with pytest.raises(ip.IPolicyError, match="differs in: model"):
        ip.analyse(loaded=llama, samples=samples(ROWS), out=tmp_path / "y")


def test_compare_refuses_a_folder_whose_responses_came_from_another_model(tiny_llama, tiny_qwen3, tiny_mistral, tmp_path):
    options = dict(data="arithmetic", limit=2, max_new_tokens=4, out=tmp_path / "o")
    first = ip.compare([str(tiny_llama), str(tiny_qwen3)], **options)
    with pytest.raises(ip.IPolicyError, match="differs in: model"):  # mistral would generate other responses
        ip.compare([str(tiny_mistral), str(tiny_qwen3)], **options)
    # the same first model with one more model extends the comparison, every model on the first one's responses
    extended = ip.compare([str(tiny_llama), str(tiny_qwen3), str(tiny_mistral)], **options)
    assert [s.response for s in extended.samples] == [s.response for s in first.samples]
    assert extended.tokens.groupby("checkpoint")["token_id"].apply(tuple).nunique() == 1
    # and a shorter comparison leaves no stale model folder behind
    ip.compare([str(tiny_llama), str(tiny_mistral)], **options)
    assert sorted(p.name for p in (tmp_path / "o" / "checkpoints").iterdir()) == sorted([tiny_llama.name,
                                                                                         tiny_mistral.name])
    # a model given twice, and --overwrite of a comparison folder: every model keeps its own label and folder
    again = ip.compare([str(tiny_llama), str(tiny_llama)], **{**options, "overwrite": True})
    assert sorted(set(again.tokens["checkpoint"])) == [f"{tiny_llama.name}#0", f"{tiny_llama.name}#1"]
    assert again.last_checkpoint == f"{tiny_llama.name}#1" and len(again._last_step()) == len(first._last_step())
    assert sorted(p.name for p in (tmp_path / "o" / "checkpoints").iterdir()) == [f"{tiny_llama.name}#0",
                                                                                  f"{tiny_llama.name}#1"]


def test_fingerprints_hold_resolved_values(tiny_llama, rows_file, tmp_path, monkeypatch):
    monkeypatch.chdir(rows_file.parent)
    ip.analyse(model=str(tiny_llama), data=rows_file.name, out=tmp_path / "z")
    manifest = json.loads((tmp_path / "z" / "manifest.json").read_text())
    assert manifest["fingerprint"]["dtype"] == "float32" and manifest["fingerprint"]["data"] == str(rows_file)
    seen = []
    monkeypatch.setattr(ip.EntropyEngine, "analyse_batch", lambda *a, **k: seen.append(1))
    ip.analyse(model=str(tiny_llama), data=str(rows_file), dtype="float32", out=tmp_path / "z")  # one run, resumed
    assert seen == []
    summary = ip.evaluate(model=[str(tiny_llama)], data=["add-sub-1:test"], n=1, limit=1, max_new_tokens=2,
                          out=tmp_path / "e").summary
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["fingerprint"]["dtype"] == "float32"
    assert len(summary) == 1


# ---------------------------------------------------------------------------------------------------- 3, 6: training
def test_resume_refuses_changed_options_and_allows_more_steps(tiny_llama, train_rows, tmp_path):
    out = tmp_path / "run"
    common = ["--model", tiny_llama, "--data", train_rows / "rows.jsonl", "--reward", f"{train_rows / 'rewards.py'}:fn",
              "--prompts-per-step", "2", "--max-new-tokens", "4", "--out", out, "-q"]
    assert run_cli("train-grpo", *common, "--group-size", "2", "--steps", "1").exit_code == 0
    stored = (out / "run.json").read_text()
    changed = run_cli("train-bupo", *common, "--resume", "--steps", "3", "--internal-layer", "2", "--internal-steps", "1",
                      "--lr", "0.5", "--group-size", "3")
    assert changed.exit_code == 2
    for flag in ("--internal-layer", "--internal-steps", "--lr", "--group-size"):
        assert flag in changed.output
    assert (out / "run.json").read_text() == stored and not (out / "checkpoints" / "step-2").exists()
    more = run_cli("train-grpo", *common, "--group-size", "2", "--steps", "2", "--resume")
    assert more.exit_code == 0, more.output
    assert [p.name for p in ip.TrainResult.load(out).checkpoints] == ["step-1", "step-2"]
    done = run_cli("train-grpo", *common, "--group-size", "2", "--steps", "2", "--resume")
    assert done.exit_code == 0 and "already at step 2" in done.output
    # the same file under another spelling resumes; a file whose prompts changed, or a reward whose code did, does not
    rows = (train_rows / "rows.jsonl").read_text()
    (train_rows / "rows.jsonl").write_text(rows.replace("What is 0 + 1?", "What is 9 + 9?"))
    try:
        changed_data = run_cli("train-grpo", *common, "--group-size", "2", "--steps", "3", "--resume")
        assert changed_data.exit_code == 2 and "the prompts of --data" in changed_data.output
    finally:
        (train_rows / "rows.jsonl").write_text(rows)


def test_a_run_stopped_before_its_first_checkpoint_starts_again(tiny_llama, train_rows, tmp_path, monkeypatch):
    import internal_policy.rl.trainer as trainer

    out = tmp_path / "run"
    args = ["train-bupo", "--model", tiny_llama, "--data", train_rows / "rows.jsonl", "--reward",
            f"{train_rows / 'rewards.py'}:fn", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
            "--internal-layer", "2", "--internal-steps", "1", "--steps", "2", "--save-every", "2", "--out", out, "-q"]
    original = trainer.Trainer.train_step
    monkeypatch.setattr(trainer.Trainer, "train_step", lambda self, step: original(self, step) if step == 1
                        else (_ for _ in ()).throw(KeyboardInterrupt()))
    assert run_cli(*args).exit_code == 130
    assert ip.TrainResult.load(out).internal_layer == 2 and not (out / "checkpoints").exists()  # labelled for what it is
    refused = run_cli(*args, "--resume")
    assert refused.exit_code == 2 and "rerun without --resume to start it again" in refused.output
    monkeypatch.setattr(trainer.Trainer, "train_step", original)
    again = run_cli(*args)
    assert again.exit_code == 0, again.output
    assert list(ip.TrainResult.load(out).metrics["step"]) == [1, 2]


def test_configs_keep_auto_until_use_and_refuse_half_a_bupo():
    assert dataclasses.replace(ip.TrainConfig(), data="math500").resolved_reward == "math"
    assert dataclasses.replace(ip.TrainConfig(data="math500"), data="add-sub-1").resolved_reward == "last-number"
    with pytest.raises(ip.IPolicyError, match="`internal_layer` 5 is given but `internal_steps` is 0"):
        ip.TrainConfig(internal_layer=5)
    with pytest.raises(ip.IPolicyError, match="`internal_steps` 2 needs `internal_layer`"):
        ip.TrainConfig(internal_steps=2)
    bupo = ip.TrainConfig(internal_layer=5, internal_steps=2)
    assert dataclasses.replace(bupo, steps=20).internal_layer == 5


# ---------------------------------------------------------------------------------------------------- 4: nulls
def test_parquet_nulls_stay_missing(tiny_llama, tmp_path):
    table = pa.table({"prompt": ["What is 2 + 2?", "What is 1 + 1?"], "response": [None, "2"],
                      "answer": pa.array([4, None], pa.int64())})
    pq.write_table(table, tmp_path / "rows.parquet")
    rows = ip.load_samples(str(tmp_path / "rows.parquet"))
    assert [(s.response, s.answer) for s in rows] == [(None, "4"), ("2", None)]
    with pytest.raises(ip.IPolicyError, match="`reward` math needs ground truths, but row '.*' .* has none"):
        ip.Trainer(ip.TrainConfig(model=str(tiny_llama), data=str(tmp_path / "rows.parquet"), reward="math"),
                   tmp_path / "run")


# ---------------------------------------------------------------------------------------------------- 5: KL reference
def test_the_kl_reference_reads_its_states_with_its_own_unembedding(tiny_llama, train_rows, tmp_path):
    config = ip.TrainConfig(model=str(tiny_llama), data=str(train_rows / "rows.jsonl"), kl_coef=0.1, device="cpu",
                            reward=f"{train_rows / 'rewards.py'}:fn", max_new_tokens=4)
    trainer = ip.Trainer(config, tmp_path / "run")
    prompt = trainer.prompt_ids[0]
    rows = [(prompt, [17, 40, 41])]
    before = trainer.update._reference_log_probs(rows, None)
    with torch.no_grad():  # training moves the policy's unembedding; the reference's must not follow
        trainer.model.lm_head.weight.add_(torch.randn_like(trainer.model.lm_head.weight))
    after = trainer.update._reference_log_probs(rows, None)
    frozen = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        logits = frozen(torch.tensor([prompt + [17, 40]])).logits[0, len(prompt) - 1 :].double()
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor([[17], [40], [41]])).squeeze(-1)
    torch.testing.assert_close(after.double(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(after, before)


# ---------------------------------------------------------------------------------------------------- 8: stale files
def test_no_stale_file_survives_a_rerun_or_a_refused_overwrite(tiny_llama, rows_file, tmp_path):
    out = tmp_path / "r"
    assert run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", out, "-q", "--refine-layer", "2").exit_code == 0
    assert (out / "refinement.csv").is_file()
    assert run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", out, "-q").exit_code == 0  # no refine_layer
    assert not (out / "refinement.csv").exists() and ip.EntropyResult.load(out).refinement is None
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    typo = run_cli("entropy", "-m", tmp_path / "no-such-model", "-d", rows_file, "-o", out, "-q", "--overwrite")
    assert typo.exit_code == 2 and {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    (out / "view.html").write_text("an old view")
    replaced = run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", out, "-q", "--overwrite", "--norm-mode", "final")
    assert replaced.exit_code == 0 and not (out / "view.html").exists()
    assert json.loads((out / "manifest.json").read_text())["norm_mode"] == "final"


# ---------------------------------------------------------------------------------------------------- 9: figures
def _fake_run(folder: Path, seed: int, k: int | None, reward: float, lr: float = 1e-5) -> Path:
    folder.mkdir(parents=True)
    steps = [{"step": s, "phase": "internal" if k and s == 1 else "full", "reward_mean": reward, "accuracy": reward,
              "response_len_mean": 3.0, "entropy": 1.0, "internal_entropy": 2.0} for s in (1, 2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in steps))
    config = {"seed": seed, "internal_steps": 1 if k else 0, "lr": lr}
    (folder / "run.json").write_text(json.dumps({"config": config, "internal_layer": k}))
    return folder


def test_figures_keep_methods_runs_and_results_apart(tiny_llama, rows_file, tmp_path, monkeypatch):
    runs = [_fake_run(tmp_path / "a" / "grpo", 1, None, 0.1), _fake_run(tmp_path / "a" / "k5", 1, 5, 0.2),
            _fake_run(tmp_path / "a" / "k15", 1, 15, 0.3), _fake_run(tmp_path / "b" / "grpo", 1, None, 0.4),
            _fake_run(tmp_path / "c" / "grpo", 2, None, 0.5, lr=1e-3)]
    drawn = {}
    original = figures_module.training_curves
    monkeypatch.setattr(figures_module, "training_curves", lambda r: drawn.update(r) or original(r))
    for n, tolerance in (("one", 0.0), ("two", 10.0)):  # two results with one folder name
        ip.analyse(model=str(tiny_llama), data=str(rows_file), boundary_tolerance=tolerance, out=tmp_path / n / "res")
    boundaries = []
    original_change = figures_module.entropy_change
    monkeypatch.setattr(figures_module, "entropy_change",
                        lambda s, b, *a, **k: boundaries.append(b) or original_change(s, b, *a, **k))
    written = ip.figures_from_results([*runs, tmp_path / "one" / "res", tmp_path / "two" / "res"], tmp_path / "fig")
    assert len(drawn) == 5  # no run overwrote another of the same seed
    assert {label.split(" seed")[0] for label in drawn} == {"GRPO, lr=1e-05", "GRPO, lr=0.001", "BuPO K=5 S=1",
                                                             "BuPO K=15 S=1"}  # another learning rate is another method
    names = {p.name for p in written}
    assert {"one-res_entropy_flow.png", "two-res_entropy_flow.png"} <= names
    stored = [ip.EntropyResult.load(tmp_path / n / "res").boundary for n in ("one", "two")]
    assert boundaries[-2:] == stored and stored[1] is None  # each with its own run's tolerance


# ---------------------------------------------------------------------------------------------------- 10, 12: tokens
def test_empty_responses_are_skipped_and_counted(tiny_llama, tmp_path):
    rows = [{"prompt": "hello world", "response": ""}, *ROWS[:2]]
    result = ip.analyse(model=str(tiny_llama), samples=samples(rows), out=tmp_path / "a")
    assert result.manifest["skipped_samples"] == ["s0"] and 0 not in set(result.tokens["sample_index"])
    empty = run_cli("entropy", "-m", tiny_llama, "-d", _jsonl(tmp_path / "e.jsonl", [rows[0]]), "-o", tmp_path / "b", "-q")
    assert empty.exit_code == 2 and "empty response" in empty.output and len(empty.output.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_generated_response_is_analysed_with_its_stop_token(tiny_llama, tmp_path, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    eos = tokenizer.eos_token_id
    words = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    # one response stopped after two words, another at once: both decisions to stop are analysed
    monkeypatch.setattr(entropy_run, "sample_responses", lambda loaded, ids, sampling, n, progress: [words + [eos], [eos]])
    result = ip.analyse(model=str(tiny_llama), samples=samples([{"prompt": "the lazy dog"}, {"prompt": "hi"}]),
                        out=tmp_path / "g")
    stored = [json.loads(line) for line in (tmp_path / "g" / "samples.jsonl").read_text().splitlines()]
    assert [(s["response"], s["eos"]) for s in stored] == [("hello world", tokenizer.eos_token), ("", tokenizer.eos_token)]
    last = result.tokens[result.tokens["module"] == "layer"].groupby("sample_index")["token_id"].last()
    assert list(last) == [eos, eos] and result.manifest["skipped_samples"] == []
    # the entropies of the stop decision match the float64 reference on the same token ids
    reference = reference_token_table(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), tokenizer, [{}],
                                      token_ids=[tokenizer("the lazy dog", add_special_tokens=False)["input_ids"],
                                                 words + [eos]])
    mine = result.tokens[result.tokens["sample_index"] == 0].sort_values(["layer", "module", "position"])
    reference = reference.sort_values(["layer", "module"], kind="stable")
    assert len(mine) == len(reference)
    assert (mine["entropy_out"].to_numpy() - reference["entropy_out"].to_numpy()).__abs__().max() < 1e-3
    # complete_samples keeps a stop token only where the response ended with one
    done = complete_samples(tokenizer, samples([{"prompt": "hi"}]), 2, lambda ids, n: [words, words + [eos]])
    assert [(s.response, s.eos) for s in done] == [("hello world", None), ("hello world", tokenizer.eos_token)]
    assert tokenize_sample(tokenizer, done[1]).response_ids == words + [eos]
    # a response cut inside a multi-byte character: its text re-tokenizes otherwise, the sampled ids are analysed
    half = tokenizer.convert_tokens_to_ids("Ã")  # the byte 0xC3 alone: decodes to U+FFFD
    cut = complete_samples(tokenizer, samples([{"prompt": "hi"}]), 1, lambda ids, n: [words + [half]])[0]
    assert cut.response.endswith("\ufffd") and tokenizer(cut.response, add_special_tokens=False)["input_ids"] != words + [half]
    assert tokenize_sample(tokenizer, cut).response_ids == words + [half]
    qwen_like = ip.Sample(id="x", prompt="hi", response=cut.response, response_ids=[1, 2, 3])  # another tokenizer's ids
    assert tokenize_sample(tokenizer, qwen_like).response_ids == tokenizer(cut.response, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------- 11: permissions
def test_output_files_get_the_permissions_of_the_users_umask(tiny_llama, rows_file, tmp_path):
    previous = os.umask(0o022)
    try:
        ip.analyse(model=str(tiny_llama), data=str(rows_file), out=tmp_path / "p")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "p").iterdir() if p.is_file()}
    assert modes and set(modes.values()) == {0o644}, modes
    assert not list(tmp_path.glob(".p.lock*"))  # and no lock file is left beside the folder


# ---------------------------------------------------------------------------------------------------- 18, 19, 20
def test_one_front_door_result_objects_and_decoded_tokens(tiny_llama, train_rows, rows_file, tmp_path):
    evaluation = ip.evaluate(model=str(tiny_llama), data="add-sub-1:test", n=2, limit=2, max_new_tokens=3)
    assert isinstance(evaluation, ip.EvalResult) and evaluation.out is None and len(evaluation.problems) == 2
    assert list(tmp_path.iterdir()) == []  # nothing written without `out`
    run = ip.train(model=str(tiny_llama), data=str(train_rows / "rows.jsonl"), reward=f"{train_rows / 'rewards.py'}:fn",
                   steps=1, prompts_per_step=2, group_size=2, max_new_tokens=3, limit=4, out=tmp_path / "run")
    assert isinstance(run, ip.TrainResult) and list(run.metrics["step"]) == [1] and run.internal_layer is None
    assert repr(ip.TrainResult.load(tmp_path / "run")).startswith("TrainResult(GRPO seed 0, 1 steps")
    tokens = ip.analyse(model=str(tiny_llama), data=str(rows_file)).tokens
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert list(tokens["text"]) == [tokenizer.decode([i]) for i in tokens["token_id"]]
    assert (tokens["text"] != tokens["token"]).any()  # 'Ġthe' is ' the'


def test_eval_extends_with_another_dataset_and_names_the_near_builtin(tiny_llama, tmp_path, monkeypatch):
    options = dict(model=str(tiny_llama), n=1, limit=2, max_new_tokens=2, out=tmp_path / "e")
    ip.evaluate(data="add-sub-1:test", **options)
    both = ip.evaluate(data=["add-sub-1:test", "mul-1:test"], **options)
    assert set(both.summary["dataset"]) == {"add-sub-1:test", "mul-1:test"}
    assert len(list((tmp_path / "e" / "responses").glob("*.jsonl"))) == 2
    pd.testing.assert_frame_equal(ip.EvalResult.load(tmp_path / "e").summary, both.summary, check_dtype=False)
    for typo, meant in (("math-500", "math500"), ("add-sub-1:tset", "add-sub-1:test")):
        with pytest.raises(ip.IPolicyError, match=meant):
            ip.load_samples(typo)
    assert not list(tmp_path.glob(".e.lock*"))


def test_two_models_on_the_command_line_then_overwritten(tiny_llama, tiny_qwen3, rows_file, tmp_path):
    out = tmp_path / "two"
    both = run_cli("entropy", "-m", tiny_llama, "-m", tiny_qwen3, "-d", rows_file, "-o", out, "-q")
    assert both.exit_code == 0 and f"the last one, {tiny_qwen3.name}" in " ".join(both.output.split())
    (out / "view.html").write_text("a view of the old results")
    again = run_cli("entropy", "-m", tiny_llama, "-m", tiny_qwen3, "-d", rows_file, "-o", out, "-q", "--overwrite",
                    "--top-k", "2")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "manifest.json").read_text())["checkpoints"][-1]["config"]["top_k"] == 2
    assert not (out / "view.html").exists()
    single = run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", out, "-q", "--overwrite")
    assert single.exit_code == 0 and not (out / "checkpoints").exists() and not (out / "entropy_dynamics.png").exists()


def test_eval_refuses_responses_scored_by_reward_code_that_changed(tiny_llama, tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text("def fn(prompt, response, truth):\n    return 0.0\n")
    options = dict(model=str(tiny_llama), data="add-sub-1:test", n=1, limit=2, max_new_tokens=2,
                   reward=f"{reward}:fn", out=tmp_path / "e")
    assert ip.evaluate(**options).summary["avg@1"].iloc[0] == 0.0
    reward.write_text("def fn(prompt, response, truth):\n    return 1.0\n")
    with pytest.raises(ip.IPolicyError, match="differs in: reward_code"):
        ip.evaluate(**options)
    assert ip.evaluate(**options, overwrite=True).summary["avg@1"].iloc[0] == 1.0


def test_results_never_go_into_a_training_run_and_a_same_rerun_keeps_the_view(tiny_llama, train_rows, rows_file,
                                                                               tmp_path):
    run = tmp_path / "run"
    assert run_cli("train-grpo", "--model", tiny_llama, "--data", train_rows / "rows.jsonl", "--reward",
                   f"{train_rows / 'rewards.py'}:fn", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens",
                   "4", "--steps", "1", "--out", run, "-q").exit_code == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    into_run = run_cli("entropy", "--run", run, "-d", rows_file, "-o", run, "-q", "--overwrite")
    assert into_run.exit_code == 2 and "training run's folder" in into_run.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing removed
    into_model = run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", tiny_llama, "-q")
    assert into_model.exit_code == 2 and "a model folder" in into_model.output
    out = tmp_path / "result"
    assert run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", out, "-q").exit_code == 0
    assert run_cli("view", out).exit_code == 0
    assert run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", out, "-q").exit_code == 0
    assert (out / "view.html").is_file()  # the same results: the view of them stays


def test_text_with_line_separators_reads_back(tiny_llama, tmp_path):
    """U+2028, U+2029 and U+0085 inside a JSON string (written unescaped) are not line ends."""
    data = tmp_path / "rows.jsonl"
    text = "first\u2028second\u2029third\x85fourth"
    data.write_text(json.dumps({"prompt": "say " + text, "response": "ok " + text}, ensure_ascii=False) + "\n"
                    + json.dumps(ROWS[0]) + "\n")
    out = tmp_path / "out"
    result = ip.analyse(model=str(tiny_llama), data=str(data), out=out)
    again = ip.analyse(model=str(tiny_llama), data=str(data), out=out)  # resumes: reads samples.jsonl back
    assert ip.EntropyResult.load(out).samples[0].response == "ok " + text == again.samples[0].response
    assert result.manifest["n_samples"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\nnot json\n")
    with pytest.raises(ip.IPolicyError, match="line 2"):
        ip.analyse(model=str(tiny_llama), data=str(bad))


def test_models_compared_at_one_step_are_drawn_apart():
    """Two different models (each at step 0) are two columns of the dynamics figure, never their average; the flow
    figure of a comparison draws the last model."""
    rows = [{"checkpoint": name, "step": 0, "layer": layer, "module": module, "entropy_in_mean": 3.0,
             "entropy_out_mean": value + layer, "delta_mean": -1.0, "delta_q25": -1.5, "delta_q75": -0.5}
            for name, value in (("model-a", 1.0), ("model-b", 5.0)) for layer in (1, 2)
            for module in ("layer", "attn", "ffn")]
    summary = pd.DataFrame(rows)
    fig = figures_module.entropy_dynamics(summary)
    lines = next(ax for ax in fig.axes if ax.get_title() == "One line per layer").lines
    assert [list(line.get_ydata()) for line in lines] == [[2.0, 6.0], [3.0, 7.0]]  # layer 1, layer 2: a then b
    last, label = figures_module.last_model(summary)
    assert label == "model-b" and set(last["entropy_out_mean"]) == {6.0, 7.0}
