"""ipolicy: internal policies of language models, their entropies, and Bottom-up Policy Optimization.

Everything a notebook needs is here; every ``ipolicy`` command is one of these calls::

    import internal_policy as ip

    result = ip.analyse(model="smollm2-135m-instruct", data="math500", limit=8)   # ipolicy entropy
    result.summary, result.tokens, result.boundary, result.plot_flow()
    ip.compare(["runs/bupo"], data="math500", limit=8)                          # across checkpoints
    ip.train(ip.TrainConfig(internal_layer=5, internal_steps=2), out="runs/bupo")  # ipolicy train-bupo
    ip.evaluate(model=["runs/bupo"], data=["amc23"], out="runs/eval")            # ipolicy eval

Definitions of every number: docs/definitions.md. Names are imported on first use, so ``import internal_policy``
is instant and loads neither torch nor transformers until a model is needed.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("ipolicy")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0.0.0+unknown"

# public name -> the module that defines it
_EXPORTS = {
    # configuration and errors
    "EntropyConfig": "config", "TrainConfig": "config", "EvalConfig": "config", "DEFAULT_MODEL": "config",
    "IPolicyError": "errors",
    # models and data
    "load_model": "models", "LoadedModel": "models",
    "load_samples": "data", "Sample": "data", "TokenizedSample": "data", "tokenize_sample": "data",
    "BUILTIN_DATASETS": "data",
    "generate_responses": "rl.generation",
    # the lens and the entropy run
    "analyse": "entropy_run", "compare": "entropy_run", "EntropyResult": "entropy_run",
    "EntropyEngine": "lens.engine", "PolicyHead": "lens.policy", "feature_refinement": "lens.refinement",
    # statistics
    "summarize": "stats", "boundary_layer": "stats", "pass_at_k": "stats",
    # training and evaluation
    "train": "rl.trainer", "Trainer": "rl.trainer", "TrainResult": "rl.trainer",
    "evaluate": "evaluation", "EvalResult": "evaluation",
    # result folders and figures
    "RunFolder": "runs", "figures_from_results": "figures",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'internal_policy' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # next time, no lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .config import DEFAULT_MODEL, EntropyConfig, EvalConfig, TrainConfig
    from .data import BUILTIN_DATASETS, Sample, TokenizedSample, load_samples, tokenize_sample
    from .entropy_run import EntropyResult, analyse, compare
    from .errors import IPolicyError
    from .evaluation import EvalResult, evaluate
    from .figures import figures_from_results
    from .lens.engine import EntropyEngine
    from .lens.policy import PolicyHead
    from .lens.refinement import feature_refinement
    from .models import LoadedModel, load_model
    from .rl.generation import generate_responses
    from .rl.trainer import Trainer, TrainResult, train
    from .runs import RunFolder
    from .stats import boundary_layer, pass_at_k, summarize
