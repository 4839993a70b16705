"""The Python front door: what a notebook imports, that its one call equals the CLI, and that errors speak the
caller's language (parameters in Python, flags on the command line)."""

import json
import math
import re
import subprocess
import sys

import matplotlib
import pandas as pd
import pytest

import internal_policy as ip
from cli_helpers import run_cli
from internal_policy.data import render_prompt
from internal_policy.stats import boundary_layer
from tiny_models import save_tiny_model


def test_import_is_light_and_everything_exported_resolves():
    code = ("import sys, internal_policy as ip; print(ip.__version__); print(len(ip.__all__)); "
            "print('torch' in sys.modules)")
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert lines[0] == ip.__version__ and lines[0] != "0.0.0+unknown" and lines[2] == "False"
    for name in ip.__all__:
        assert getattr(ip, name) is not None, name
    assert (__import__("pathlib").Path(ip.__file__).parent / "py.typed").is_file()


def test_analyse_in_memory_over_several_batches_equals_the_float64_reference(tiny_llama, rows_file, tmp_path,
                                                                              monkeypatch):
    """ip.analyse, batched and streaming as the CLI runs it, writes nothing without `out`, and every per-token entropy
    equals the independent float64 implementation (tests/reference.py), token by token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import ROWS
    from reference import reference_token_table

    monkeypatch.chdir(tmp_path)
    batches = []
    original = ip.EntropyEngine.analyse_batch
    monkeypatch.setattr(ip.EntropyEngine, "analyse_batch", lambda self, s, sample_index=None: batches.append(sample_index)
                        or original(self, s, sample_index))
    result = ip.analyse(model=str(tiny_llama), data=str(rows_file), batch_tokens=40)
    assert len(batches) > 1  # more samples than fit one batch
    assert list(tmp_path.iterdir()) == [] and result.out is None  # nothing written
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)
    reference = pd.concat([reference_token_table(model, tokenizer, [row]).assign(sample_index=i)
                           for i, row in enumerate(ROWS)])
    reference["rank"] = reference.groupby(["sample_index", "layer", "module"]).cumcount()
    mine = result.tokens.copy()
    mine["rank"] = mine.groupby(["sample_index", "layer", "module"]).cumcount()  # positions in order
    merged = mine.merge(reference, on=["sample_index", "layer", "module", "rank"], suffixes=("", "_ref"),
                        validate="one_to_one")
    assert len(merged) == len(mine) == len(reference)
    for column in ("entropy_in", "entropy_out"):
        assert (merged[column] - merged[f"{column}_ref"]).abs().max() < 1e-3, column
    for figure in (result.plot_flow(), result.plot_change()):
        assert len(figure.axes) == 1 and figure.axes[0].lines


def test_the_command_line_runs_as_a_module_too():
    """``python -m ipolicy_cli`` is the ``ipolicy`` command (for an environment whose scripts are not on PATH)."""
    done = subprocess.run([sys.executable, "-m", "ipolicy_cli", "entropy", "--top-k", "-1", "-m", "x"],
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "--top-k must be at least 0, got -1. Fix: pass 0 or more (0 turns predictions off)." in done.stdout + done.stderr
    assert "Usage: ipolicy entropy" in subprocess.run([sys.executable, "-m", "ipolicy_cli", "entropy", "--help"],
                                                      capture_output=True, text=True, check=True).stdout


def test_errors_name_parameters_in_python_and_flags_on_the_command_line(tiny_llama, rows_file, tmp_path):
    with pytest.raises(ip.IPolicyError, match="`max_new_tokens` must be at least 1"):
        ip.EntropyConfig(max_new_tokens=0)
    with pytest.raises(ip.IPolicyError, match="`internal_steps` \\(9\\) must be in 0..`steps` \\(4\\)"):
        ip.TrainConfig(steps=4, internal_steps=9, internal_layer=2)
    for bad, message in ((dict(lr=0), "`lr` must be > 0, got 0"), (dict(internal_layer=0, internal_steps=1),
                         "`internal_layer` must be 1 or more"), (dict(device="cudaXYZ"), "`device` must be cpu, cuda")):
        with pytest.raises(ip.IPolicyError, match=message):
            ip.TrainConfig(**bad)
    result = run_cli("entropy", "-m", tiny_llama, "-d", rows_file, "-o", tmp_path / "x", "--max-new-tokens", "0")
    assert result.exit_code == 2 and "error: --max-new-tokens must be at least 1" in result.output
    assert "`" not in result.output and not (tmp_path / "x").exists()
    # a value Typer itself cannot parse, or an unknown flag: one line with the fix too, not a usage dump and a box
    for args, problem in ((("entropy", "--top-k", "2.5"), "Invalid value for '--top-k'"),
                          (("train-grpo", "--no-such-flag"), "No such option: --no-such-flag")):
        result = run_cli(*args, "-o", tmp_path / "y")
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {problem}"), result.output
        assert lines[0].endswith(f"Fix: see `ipolicy {args[0]} --help`.") and not (tmp_path / "y").exists()


def test_configs_refuse_values_of_the_wrong_type_by_name():
    """A notebook's top_k=2.5, True or "5" is refused naming `top_k` (2.5 was truncated, "5" raised a bare TypeError),
    a float option must be finite, and a whole number is a fine float; None only where the option allows it."""
    for value, shown in ((2.5, "2.5 (float)"), (True, "True (bool)"), ("5", "'5' (str)")):
        with pytest.raises(ip.IPolicyError, match=re.escape(f"`top_k` must be a whole number, got {shown}")):
            ip.EntropyConfig(top_k=value)
    with pytest.raises(ip.IPolicyError, match="`temperature` must be a finite number, got inf"):
        ip.EntropyConfig(temperature=math.inf)
    with pytest.raises(ip.IPolicyError, match="`lr` must be a finite number, got nan"):
        ip.TrainConfig(lr=math.nan)
    with pytest.raises(ip.IPolicyError, match=re.escape("`steps` must be a whole number, got None")):
        ip.TrainConfig(steps=None)
    with pytest.raises(ip.IPolicyError, match=re.escape("`k` must be a whole number or several, got (1, 2.5)")):
        ip.EvalConfig(k=(1, 2.5))
    assert ip.TrainConfig(lr=1, internal_layer="auto", internal_steps=2).lr == 1
    assert ip.EntropyConfig(limit=None, boundary_tolerance=0).top_k == 5
    for bad, message in ((dict(internal_layer="³", internal_steps=1), "`internal_layer` must be a layer number or 'auto'"),
                         (dict(reward=5), "`reward` must be a name, FILE.py:FUNCTION or a function, got 5"),
                         (dict(lr=10**400), r"`lr` must be a finite number, got 1000.*\(401 characters\)")):
        with pytest.raises(ip.IPolicyError, match=message):
            ip.TrainConfig(**bad)
    for bad, message in ((dict(k=None), "`k` must be a whole number or several, got None"),
                         (dict(model=None), "`model` must be a string or several, got None")):
        with pytest.raises(ip.IPolicyError, match=re.escape(message)):
            ip.EvalConfig(**bad)
    # numpy scalars, paths and a dict of template options are fine, and stored as plain values (run.json, manifests)
    import numpy as np
    from pathlib import Path

    config = ip.TrainConfig(group_size=np.int64(4), lr=np.float32(0.5), autocast=np.bool_(True), model=Path("m"),
                            chat_template_kwargs={"enable_thinking": False})
    stored = json.loads(json.dumps(config.record()))
    assert (stored["group_size"], stored["lr"], stored["autocast"], stored["model"]) == (4, 0.5, True, "m")
    assert stored["chat_template_kwargs"] == {"enable_thinking": False}
    assert ip.EvalConfig(k=np.int64(4), n=8).k == (4,) and type(ip.EvalConfig(k=[np.int64(4)], n=8).k[0]) is int


def test_refine_layer_is_checked_before_anything_is_generated(tiny_llama, tmp_path):
    out = tmp_path / "out"
    result = run_cli("entropy", "-m", tiny_llama, "-o", out, "-q", "--limit", "2", "--max-new-tokens", "4",
                     "--refine-layer", "99")
    assert result.exit_code == 2 and "--refine-layer must be in 1..3" in result.output
    assert not out.exists()


THINKING_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n"
                     "{% if enable_thinking is defined and not enable_thinking %}hello world\n{% endif %}{% endif %}")


def test_chat_template_kwargs_reach_every_rendered_prompt(tmp_path):
    folder = save_tiny_model(tmp_path / "thinking", "qwen3")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = THINKING_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    samples = [ip.Sample(id="a", prompt=[{"role": "user", "content": "What is 3 * 4?"}], response="12")]
    plain = ip.analyse(model=str(folder), samples=samples)
    quiet = ip.analyse(model=str(folder), samples=samples, chat_template_kwargs='{"enable_thinking": false}')
    loaded = ip.load_model(str(folder))
    rendered = render_prompt(loaded.tokenizer, samples[0].prompt, {"enable_thinking": False})
    assert rendered.endswith("assistant\nhello world\n")
    shift = len(loaded.tokenizer("hello world\n", add_special_tokens=False)["input_ids"])
    assert shift > 0 and (quiet.tokens["position"] - plain.tokens["position"] == shift).all()
    assert quiet.manifest["config"]["chat_template_kwargs"] == '{"enable_thinking": false}'
    with pytest.raises(ip.IPolicyError, match="`chat_template_kwargs` must be a JSON object"):
        ip.EntropyConfig(chat_template_kwargs="[1, 2]")
    # the trainer renders its prompts the same way
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": samples[0].prompt, "answer": "12"}) + "\n")
    trainer = ip.Trainer(ip.TrainConfig(model=str(folder), data=str(tmp_path / "rows.jsonl"), steps=1, device="cpu",
                                        max_new_tokens=4, chat_template_kwargs='{"enable_thinking": false}'),
                         tmp_path / "run")
    assert trainer.prompt_ids[0] == loaded.tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_boundary_layer_and_its_tolerance():
    def summary(deltas):
        return pd.DataFrame({"layer": range(1, len(deltas) + 1), "module": "ffn", "delta_mean": deltas})

    assert boundary_layer(summary([0.3, 0.2, 0.01, -0.4, 0.5])) == 2  # the first run of exploring layers ends at 2
    assert boundary_layer(summary([-0.1, 0.3, 0.06, 0.0])) == 3
    assert boundary_layer(summary([-0.1, 0.3, 0.06, 0.0]), tolerance=0.1) == 2
    assert boundary_layer(summary([-0.1, -0.2, 0.04])) is None


def test_figures_leave_the_callers_style_alone(tiny_llama, rows_file):
    before = dict(matplotlib.rcParams)
    result = ip.analyse(model=str(tiny_llama), data=str(rows_file))
    result.plot_flow()
    result.plot_change()
    after = dict(matplotlib.rcParams)
    assert {k for k in before if before[k] != after[k]} == set()


def test_the_cli_answers_help_and_bad_flags_without_loading_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom ipolicy_cli.main import app\n"
            "for args in (['--help'], ['entropy', '--help'], ['train-bupo', '--help'], ['entropy', '--no-such-flag']):\n"
            "    CliRunner().invoke(app, args)\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_a_result_presents_itself_in_one_line_and_a_compact_notebook_cell(tiny_llama, rows_file):
    import html

    result = ip.analyse(model=str(tiny_llama), data=str(rows_file))
    line = repr(result)
    assert "\n" not in line and len(line) < 200
    assert "samples=5" in line and f"tokens={result.manifest['n_tokens']}" in line and "layers=4" in line
    cell = result._repr_html_()
    assert html.escape(line) in cell and cell.count("<tr") <= 8 and "data:image/png;base64," in cell
    assert result.samples[2].response not in cell  # no dump of the samples or the manifest
    page = result.view(samples=1)
    assert type(page).__name__ == "ViewPage"
    assert page._repr_html_().startswith("<iframe srcdoc=") and "&lt;script" in page._repr_html_()


def test_help_reads_whole_on_an_80_and_a_60_column_terminal():
    """Every --help on a common 80-column terminal: no link folded or cut with an ellipsis (a link must stay whole to
    be opened), and no line break left from the docstring in the middle of a sentence (rich wraps each paragraph). On a
    60-column one, every flag whole and nothing cut with an ellipsis."""
    import typer.main
    from typer.testing import CliRunner

    from internal_policy.config import DEFINITIONS_URL, DOCS_URL
    from ipolicy_cli.main import app

    whole = {DOCS_URL, DEFINITIONS_URL, f"{DOCS_URL}/performance/",
             *(f"{DEFINITIONS_URL}#{anchor}" for anchor in ("4-grpo", "5-bupo", "6-evaluation"))}
    commands = typer.main.get_command(app).commands
    seen = set()
    for command in ([], *([name] for name in commands)):
        shown = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"}).output
        assert "…" not in shown, command
        links = set(re.findall(r"https://[^\s│]+", shown))
        assert links <= whole, (command, links - whole)
        seen |= links
    assert seen == whole  # every link is shown somewhere
    for name, command in commands.items():
        assert not re.search(r"[^\n]\n[^\n]", command.help), name
        # on a narrow (60-column) terminal too, every flag is shown whole and no word of its help is cut
        narrow = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "60", "TERMINAL_WIDTH": "60"}).output
        assert "…" not in narrow, name
        flags = {flag for parameter in command.params for flag in parameter.opts if flag.startswith("--")}
        assert flags <= set(re.findall(r"--[\w-]+", narrow)), (name, flags - set(re.findall(r"--[\w-]+", narrow)))
