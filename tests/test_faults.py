"""Faults as a battery: concurrent writers, SIGKILL mid-checkpoint, damaged checkpoints and shards, a full disk, an
unusable --out, a reward that raises. Each is refused with one clear line, and nothing a user wrote is lost."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import internal_policy.entropy_run as entropy_run
from cli_helpers import run_cli

ROOT = Path(__file__).parents[1]
REWARDS = '''
CALLS = []

def fn(prompt, response, ground_truth):
    return sum(ch.isdigit() for ch in response) / max(1, len(response))

def boom_on_step_two(prompt, response, ground_truth):
    CALLS.append(response)
    if len(CALLS) > 9:  # the probe before training, then step 1's 2 x 4 responses pass
        raise ValueError(f"cannot score {response[:10]!r}")
    return 0.5
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "rewards.py").write_text(REWARDS)
    return folder


def train_args(model, files, out, *extra, reward="fn"):
    return ["train-bupo", "--model", str(model), "--data", str(files / "rows.jsonl"), "--reward",
            f"{files / 'rewards.py'}:{reward}", "--steps", "4", "--internal-layer", "2", "--internal-steps", "2",
            "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "8", "--lr", "1e-3", "--save-every", "1",
            "--seed", "0", "--out", str(out), "-q", *extra]


def ipolicy_process(*args):
    """``ipolicy ARGS`` in a child process (its own pid, killable), from the repository root."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "ipolicy_cli.main", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, seconds=120):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def holder_record(out: Path) -> Path:
    return out.parent / f".{out.name}.lock.json"


def test_a_second_writer_is_refused_at_once_and_a_killed_holder_never_blocks(tiny_llama, tmp_path):
    out = tmp_path / "shared-out"
    args = ["entropy", "-m", tiny_llama, "-o", out, "-q", "--limit", "8", "--samples", "4", "--max-new-tokens", "48"]
    first = ipolicy_process(*args)
    wait_for(lambda: holder_record(out).is_file())
    started = time.time()
    second = run_cli(*args)
    assert second.exit_code == 2 and time.time() - started < 10
    assert f"'{out}' is being written by pid {first.pid} on " in second.output and "entropy" in second.output
    assert first.wait(timeout=600) == 0, first.stderr[-2000:]
    tokens = pd.read_parquet(out / "tokens.parquet")
    summary = pd.read_csv(out / "summary.csv")
    assert not tokens.duplicated(["sample_index", "position", "layer", "module"]).any()
    assert (summary["n_tokens"] == len(tokens) // (4 * 3)).all()
    assert not holder_record(out).exists()

    killed = tmp_path / "killed-out"
    holder = ipolicy_process(*args[:4], killed, *args[5:])
    wait_for(lambda: holder_record(killed).is_file())
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    rerun = run_cli(*args[:4], killed, *args[5:])
    assert rerun.exit_code == 0, rerun.output
    assert pd.read_csv(killed / "summary.csv")["n_tokens"].iloc[0] > 0


KILL_DURING_STEP_3 = """
import os, signal, sys
import safetensors.torch
from ipolicy_cli.main import app

save_file = safetensors.torch.save_file

def dying(tensors, path, *args, **kwargs):  # the trainer state, written after the weights of step 3
    if ".step-3.tmp" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    return save_file(tensors, path, *args, **kwargs)

safetensors.torch.save_file = dying
sys.argv = ["ipolicy", *sys.argv[1:]]
app()
"""


def test_sigkill_during_a_checkpoint_write_resumes_from_the_last_complete_one(tiny_llama, files, tmp_path):
    full = tmp_path / "full"
    assert run_cli(*train_args(tiny_llama, files, full)).exit_code == 0
    out = tmp_path / "killed"
    script = tmp_path / "kill.py"
    script.write_text(KILL_DURING_STEP_3)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script), *train_args(tiny_llama, files, out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [".step-3.tmp", "step-1", "step-2"]

    resumed = run_cli(*train_args(tiny_llama, files, out, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    a = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["reward_mean"] == pytest.approx(y["reward_mean"]) and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    wa, wb = (load_file(r / "checkpoints" / "step-4" / "model.safetensors") for r in (full, out))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert not (out / "checkpoints" / ".step-3.tmp").exists()


def test_a_damaged_latest_checkpoint_is_refused_naming_the_previous_one(tiny_llama, files, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*train_args(tiny_llama, files, out)).exit_code == 0
    weights = out / "checkpoints" / "step-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run_cli(*train_args(tiny_llama, files, out, "--resume", "--steps", "5"))
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert f"checkpoint '{out / 'checkpoints' / 'step-4'}' is damaged" in lines[0]
    assert f"previous complete checkpoint is '{out / 'checkpoints' / 'step-3'}'" in lines[0]
    shutil.rmtree(out / "checkpoints" / "step-4")  # the fix the message gives
    assert run_cli(*train_args(tiny_llama, files, out, "--resume", "--steps", "5")).exit_code == 0


def interrupted_entropy_run(model, rows_file, out, monkeypatch):
    """An entropy run stopped after its first batch: one shard in .partial/."""
    original, calls = entropy_run.EntropyEngine.analyse_batch, []

    def crash_after_first_batch(self, samples, sample_index=None):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return original(self, samples, sample_index)

    with monkeypatch.context() as patch:
        patch.setattr(entropy_run.EntropyEngine, "analyse_batch", crash_after_first_batch)
        assert run_cli("entropy", "-m", model, "-d", rows_file, "-o", out, "-q", "--batch-tokens", "40").exit_code == 130
    shards = sorted((out / ".partial").glob("batch-*.parquet"))
    assert len(shards) == 1
    return shards[0]


@pytest.mark.parametrize("damage, expected", [
    ("truncate", "is damaged"),
    ("duplicate", "is in two shards"),
    ("foreign", "was not written by this run"),
])
def test_a_bad_shard_is_reported_never_merged(damage, expected, tiny_llama, rows_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shard = interrupted_entropy_run(tiny_llama, rows_file, out, monkeypatch)
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "duplicate":
        shutil.copy(shard, shard.with_name("batch-00001-000000.parquet"))
    else:  # a shard of a run with other settings, dropped in by hand
        other = tmp_path / "other"
        assert run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", other, "-q", "--batch-tokens", "40",
                       "--norm-mode", "final").exit_code == 0
        table = pd.read_parquet(other / "tokens.parquet")
        table[table.sample_index == 4].to_parquet(shard.with_name("batch-00001-000004.parquet"), index=False)
    result = run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", out, "-q", "--batch-tokens", "40")
    assert result.exit_code == 2 and expected in result.output, result.output
    assert not (out / "tokens.parquet").exists()


def test_a_full_disk_at_a_shard_keeps_the_shards_before_it(tiny_llama, rows_file, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    write_table, written = pq.write_table, []

    def disk_full_on_second_shard(table, where, *args, **kwargs):
        if "batch-" in str(where) and len(written) == 2:  # the first batch's predictions and tokens shards are written
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(where)
        return write_table(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", disk_full_on_second_shard)
    result = run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", out, "-q", "--batch-tokens", "40")
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert f"Could not write '{out / '.partial'}" in lines[0] and "No space left on device" in lines[0]
    shards = sorted((out / ".partial").glob("*"))
    assert [p.name for p in shards if p.name.startswith("batch-")] and not [p for p in shards if p.suffix == ".tmp"]
    monkeypatch.setattr(pq, "write_table", write_table)
    assert run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", out, "-q", "--batch-tokens", "40").exit_code == 0


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(tiny_llama, files, tmp_path, monkeypatch):
    import safetensors.torch

    save_file = safetensors.torch.save_file

    def disk_full_at_step_2(tensors, path, *args, **kwargs):
        if ".step-2.tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_at_step_2)
    out = tmp_path / "run"
    result = run_cli(*train_args(tiny_llama, files, out))
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert f"Could not write '{out / 'checkpoints' / 'step-2'}': No space left on device" in lines[0]
    assert f"the previous checkpoint '{out / 'checkpoints' / 'step-1'}' is intact" in lines[0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    assert run_cli(*train_args(tiny_llama, files, out, "--resume")).exit_code == 0


def test_out_must_be_a_writable_folder(tiny_llama, rows_file, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    for command in (["entropy", "-m", tiny_llama, "-d", rows_file], ["figures", tmp_path]):
        result = run_cli(*command, "-o", a_file)
        assert result.exit_code == 2 and f"--out '{a_file}' is a file, not a folder" in result.output, result.output
    assert a_file.read_text() == "mine"
    locked = tmp_path / "read-only"
    locked.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(locked)]).returncode != 0:
        pytest.skip("needs chattr to make a folder unwritable (root ignores permission bits)")
    try:
        result = run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", locked / "out")
        assert result.exit_code == 2 and f"is not writable" in result.output, result.output
    finally:
        subprocess.run(["chattr", "-i", str(locked)])


def test_a_reward_that_raises_shows_its_own_frames_and_keeps_the_checkpoints(tiny_llama, files, tmp_path):
    out = tmp_path / "run"
    result = run_cli(*train_args(tiny_llama, files, out, reward="boom_on_step_two"))
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "The reward function raised ValueError: cannot score" in text and "on prompt" in text and "response" in text
    assert "rewards.py" in text and "boom_on_step_two" in text  # the user's own frame
    assert "internal_policy" not in text  # and none of ipolicy's
    assert (out / "checkpoints" / "step-1" / "model.safetensors").is_file()
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1]
