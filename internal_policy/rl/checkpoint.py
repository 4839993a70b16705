"""The trainer's checkpoint part: ``checkpoints/step-N`` written whole or not at all, and read back on resume.

A checkpoint is a ``save_pretrained`` folder (safetensors weights, config, tokenizer) that transformers and every
ipolicy command load, plus the trainer state: ``trainer_state.safetensors`` (the optimizer's tensors and the torch RNG
state) and ``trainer_state.json`` (step, internal layer, optimizer hyper-parameters, Python RNG state). Nothing in a
checkpoint is a pickle, so resuming from someone else's run folder runs no code.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from ..errors import IPolicyError
from ..io import write_error
from ..runs import RunFolder

TENSORS_FILE = "trainer_state.safetensors"
STATE_FILE = "trainer_state.json"


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state dict split into tensors ("state.<param>.<name>") and everything else (JSON-able)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in info["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def save_checkpoint(run: RunFolder, step: int, model, tokenizer, optimizer, extra: dict) -> Path:
    """Write ``checkpoints/step-N`` into a hidden staging folder, then rename it into place. ``extra``: JSON-able
    trainer state (e.g. the internal layer) returned by ``load_checkpoint``."""
    from safetensors.torch import save_file

    final = run.checkpoint(step)
    staging = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        tensors, info = optimizer_state(optimizer)
        save_file({**tensors, "torch_rng": torch.random.get_rng_state()}, staging / TENSORS_FILE)
        python_rng = random.getstate()
        (staging / STATE_FILE).write_text(json.dumps({"step": step, "optimizer": info, "extra": extra,
                                                      "python_rng": [python_rng[0], list(python_rng[1]), python_rng[2]]}))
    except OSError as error:  # a full disk: drop the partial copy; the checkpoints before it are untouched
        shutil.rmtree(staging, ignore_errors=True)
        previous = run.checkpoints()
        kept = f"the previous checkpoint '{previous[-1]}' is intact" if previous else "no earlier checkpoint exists"
        raise write_error(final, error, kept) from error
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final


def load_checkpoint(run: RunFolder, model, optimizer) -> tuple[int, dict]:
    """Restore the latest checkpoint into ``model`` and ``optimizer`` and the RNG states; returns (step, extra)."""
    from safetensors.torch import load_file
    from safetensors.torch import load_model as load_safetensors

    checkpoints = run.checkpoints()
    if not checkpoints:
        raise IPolicyError(f"`resume`: '{run.path}/checkpoints' has no checkpoint. Fix: train without `resume` into a "
                           "new `out`.")
    latest = checkpoints[-1]
    if not (latest / STATE_FILE).is_file():
        old = " (a trainer_state.pt pickle from an older ipolicy, which is never loaded: it could run code)" \
            if (latest / "trainer_state.pt").is_file() else ""
        raise IPolicyError(f"`resume`: '{latest}' has no {STATE_FILE}{old}. Fix: start a new run into a new `out`, "
                           f"e.g. from that checkpoint's weights (`model` {latest}).")
    try:
        info = json.loads((latest / STATE_FILE).read_text())
        tensors = load_file(latest / TENSORS_FILE)
        shards = sorted(latest.glob("model*.safetensors"))
        for shard in shards:
            load_safetensors(model, shard, strict=len(shards) == 1)
    except Exception as error:  # safetensors and json raise several types for a truncated or damaged file
        previous = (f"The previous complete checkpoint is '{checkpoints[-2]}'. Fix: delete '{latest}' and resume "
                    "from it." if len(checkpoints) > 1 else f"Fix: delete '{latest}' and train from the start.")
        raise IPolicyError(f"`resume`: checkpoint '{latest}' is damaged ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''}). {previous}") from None
    load_optimizer_state(optimizer, tensors, info["optimizer"])
    torch.random.set_rng_state(tensors["torch_rng"])
    version, state, gauss = info["python_rng"]
    random.setstate((version, tuple(state), gauss))
    return info["step"], info["extra"]
