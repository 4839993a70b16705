"""A small GRPO / BuPO trainer (docs/definitions.md §4–5) on one machine, or several through ``accelerate launch``.

One step: take ``prompts_per_step`` prompts (a seeded order over epochs), sample ``group_size`` responses each from
the full model and score them (``rollout``), then ``ppo_epochs`` passes of clipped-surrogate updates over
mini-batches (``update``), then maybe a checkpoint (``checkpoint``).

BuPO: for steps 1..S the log-probs come from the internal layer policy pi(h_K) (no norm, divided by the rollout
temperature) and the training forward stops after layer K, so only layers 1..K, the embeddings and the unembedding
get gradient; after S it is plain GRPO on the full policy.

Outputs: a run folder (``runs.RunFolder``): ``checkpoints/step-N/``, ``metrics.jsonl``, ``run.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ..config import TrainConfig, parse_chat_template_kwargs, reward_code
from ..data import TokenizedSample, check_prompt_fits, encode, load_samples, render_prompt, samples_digest
from ..errors import IPolicyError
from ..io import atomic_write_text
from ..lens.states import ResponseForward
from ..models import LoadedModel, load_model
from ..runs import RunFolder, folder_lock
from .checkpoint import load_checkpoint, save_checkpoint
from .generation import SamplingConfig, VllmRollouts, vllm_available
from .rewards import load_reward, score
from .rollout import Rollout, RolloutSampler, prompts_for_step
from .update import PolicyUpdate

__all__ = ["TrainConfig", "Trainer", "TrainResult", "Rollout", "train"]


@dataclass
class TrainResult:
    """A training run (docs/definitions.md §4–5 and "metrics.jsonl"): ``metrics``, one row per step; ``checkpoints``,
    the complete ``checkpoints/step-N`` folders in step order; ``info``, run.json (base model, options, internal
    layer); ``out``, the run folder. ``TrainResult.load(out)`` reads a run back, finished or not."""

    metrics: pd.DataFrame
    checkpoints: list[Path]
    info: dict
    out: Path

    def __repr__(self) -> str:
        steps = int(self.metrics["step"].max()) if len(self.metrics) else 0
        return (f"TrainResult({RunFolder(self.out).label()}, {steps} steps, {len(self.checkpoints)} checkpoint(s), "
                f"out={str(self.out)!r})")

    @property
    def internal_layer(self) -> int | None:
        """BuPO's K (None for GRPO)."""
        return self.info.get("internal_layer")

    def plot_curves(self):
        """Reward, accuracy, response length, the final and the internal policy's entropy per step."""
        from .. import figures

        return figures.training_curves({RunFolder(self.out).label(): self.metrics})

    @classmethod
    def load(cls, out: str | Path) -> "TrainResult":
        run = RunFolder(out)
        if not run.is_run():
            raise IPolicyError(f"'{out}' holds no training run (no metrics.jsonl or checkpoints/). Fix: check the path.")
        metrics = run.metrics() if run.metrics_path.is_file() else pd.DataFrame()
        return cls(metrics, run.checkpoints(), run.info(), Path(out))


class Trainer:
    """Builds everything a run needs (every check runs here, before the first step), then ``run`` trains.

    ``loaded`` reuses a model already in memory (it is trained in place)."""

    def __init__(self, config: TrainConfig, out: str | Path, resume: bool = False, loaded: LoadedModel | None = None):
        self.config, self.out = config, Path(out)
        self.folder = RunFolder(self.out)
        self._check_out_folder(resume)
        if config.rollouts == "vllm" and not vllm_available():
            raise IPolicyError("`rollouts` vllm needs a CUDA GPU with the vllm and trl packages. Fix: pip install vllm "
                               "trl on the GPU machine, or use `rollouts` transformers.")
        self.samples = load_samples(config.data, limit=config.limit, seed=config.seed)
        self.reward_fn = load_reward(config.resolved_reward)
        self._check_ground_truths()
        if resume:
            self._check_same_run()
        self.loaded = loaded or load_model(config.model, dtype=self._weights_dtype, device=config.device)
        self.tokenizer = self.loaded.tokenizer
        chat = parse_chat_template_kwargs(config.chat_template_kwargs)
        prompt_texts = [render_prompt(self.tokenizer, s.prompt, chat) for s in self.samples]
        self.prompt_ids = [encode(self.tokenizer, text) for text in prompt_texts]
        self._check_lengths()
        score(self.reward_fn, prompt_texts[0], "", self.samples[0].answer,  # a bad reward fails here, not mid-run
              f"on prompt 0 ('{self.samples[0].id}') with an empty response, tried before training")
        self.accelerator = self._accelerator()
        self.head = self.loaded.policy_head(temperature=config.temperature)
        model = self.loaded.hf_model
        model.train(False)  # no dropout in RL updates; gradients flow regardless
        model.requires_grad_(True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.policy, self.optimizer = self.accelerator.prepare(ResponseForward(model), optimizer)
        self.sampler = RolloutSampler(
            self.samples, prompt_texts, self.prompt_ids, self.tokenizer, self.reward_fn,
            SamplingConfig(config.max_new_tokens, config.temperature, config.top_p,
                           batch_size=config.generation_batch_size or config.prompts_per_step * config.group_size),
            config.group_size, self._vllm())
        self.step = 0
        if resume:
            self.step, extra = load_checkpoint(self.folder, self.model, self.optimizer)
            self.internal_layer = extra["internal_layer"]  # so that `auto` does not sample again
            self._drop_metrics_after_checkpoint()
        else:
            self.internal_layer = self._resolve_internal_layer()
        self.monitor_layer = self._monitor_layer()
        reference, reference_head = self._reference()
        self.update = PolicyUpdate(config, self.accelerator, self.policy, self.optimizer, self.head, reference,
                                   reference_head, self.monitor_layer, self.tokenizer.pad_token_id or 0)
        self.writers = self._loggers()

    # ---------------------------------------------------------------- set-up
    @property
    def model(self):
        """The Hugging Face model being trained (unwrapped from DDP/FSDP)."""
        return self.accelerator.unwrap_model(self.policy).model

    @property
    def vllm(self):
        return self.sampler.vllm

    @property
    def _weights_dtype(self) -> str:
        return "float32" if self.config.dtype == "auto" else self.config.dtype

    def _check_out_folder(self, resume: bool) -> None:
        """A folder with checkpoints holds a run: continued with `resume`, never overwritten. A folder whose run was
        stopped before its first checkpoint (its logged steps only) is started again, and `resume` says so."""
        started = self.folder.is_run()
        if self.folder.checkpoints() and not resume:
            raise IPolicyError(f"'{self.out}' already holds a training run. Fix: add `resume` to continue it, or choose "
                               "another `out`.")
        if resume and not self.folder.checkpoints():
            why = ("was stopped before its first checkpoint. Fix: rerun without `resume` to start it again (its logged "
                   "steps are replaced)") if started else "has no run to resume. Fix: drop `resume` or check `out`"
            raise IPolicyError(f"`resume`: '{self.out}' {why}.")

    def _check_same_run(self) -> None:
        """`resume` continues the stored run only: the same options (but those a resumed run may change), the same
        training prompts by content, the same reward code."""
        info = self.folder.info()
        stored = info.get("config")
        if stored is None:
            return
        changed = self.config.changes_from(stored)
        listed = [f"`{k}` ({stored.get(k, 'unset')} -> {self.config.record()[k]})" for k in changed]
        if info.get("data_digest") not in (None, samples_digest(self.samples)):
            listed.append(f"the prompts of `data` (the file '{self.config.data}' changed)")
        if info.get("reward_code") not in (None, reward_code(self.config.resolved_reward)):
            listed.append(f"the code of `reward` ({self.config.resolved_reward} changed)")
        if listed:
            raise IPolicyError(
                f"`resume`: the run in '{self.out}' was trained otherwise: {', '.join(listed)}. A resumed run may "
                f"change only {', '.join(f'`{k}`' for k in TrainConfig.RESUMABLE_CHANGES)}. Fix: resume with the "
                "run's options and files (run.json), or train into a new `out` (e.g. from its latest checkpoint as "
                "`model`).")

    def _check_ground_truths(self) -> None:
        missing = next((s for s in self.samples if s.answer is None), None)
        if self.config.resolved_reward == "math" and missing is not None:
            raise IPolicyError(
                f"`reward` math needs ground truths, but row '{missing.id}' of '{self.config.data}' has none. "
                "Fix: add 'answer' (or reward_model.ground_truth) to every row, or use a custom `reward`."
            )

    def _check_lengths(self) -> None:
        for sample, ids in zip(self.samples, self.prompt_ids):
            check_prompt_fits(sample.id, len(ids), self.config.max_new_tokens, self.loaded.context_length)

    def _accelerator(self):
        """accelerate's Accelerator: DDP over gloo on the CPU (cpu=True) or NCCL on GPUs; bf16 autocast if asked."""
        from accelerate import Accelerator, DistributedDataParallelKwargs

        on_cpu = self.loaded.device.type == "cpu"
        autocast = self.config.autocast if self.config.autocast is not None else not on_cpu
        # BuPO's internal phase leaves the layers above K unused, which DDP must be told of (it costs a graph traversal)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=bool(self.config.internal_steps))
        accelerator = Accelerator(cpu=on_cpu, mixed_precision="bf16" if autocast else "no", kwargs_handlers=[ddp])
        for name in ("prompts_per_step", "mini_batch_prompts"):
            value = getattr(self.config, name)
            if value and value % accelerator.num_processes:
                raise IPolicyError(
                    f"`{name}` {value} does not split evenly over {accelerator.num_processes} processes (each takes "
                    "whole groups, and all must take part in every update). Fix: use a multiple."
                )
        return accelerator

    def _vllm(self) -> VllmRollouts | None:
        c = self.config
        if c.rollouts != "vllm":
            return None
        sequences = c.prompts_per_step // self.accelerator.num_processes * c.group_size
        sampling = SamplingConfig(c.max_new_tokens, c.temperature, c.top_p, batch_size=sequences)
        return VllmRollouts(self.model, self.accelerator, self.tokenizer, sampling, c.vllm_gpu_memory,
                            context=max(map(len, self.prompt_ids)) + c.max_new_tokens)

    def _reference(self):
        """The frozen base model of the KL penalty and its own policy head (its unembedding stays the base model's
        while the policy's is trained), or (None, None) without one."""
        if not self.config.kl_coef:
            return None, None
        reference = load_model(self.config.model, dtype=self._weights_dtype, device=str(self.loaded.device))
        reference.hf_model.requires_grad_(False)
        return ResponseForward(reference.hf_model), reference.policy_head(temperature=self.config.temperature)

    def _resolve_internal_layer(self) -> int | None:
        k, n_layers = self.config.internal_layer, self.loaded.n_layers
        if k is None:
            return None
        if k == "auto":
            return self._boundary_layer_of_first_rollouts()
        if not 1 <= k <= n_layers - 1:
            raise IPolicyError(
                f"`internal_layer` {k} is outside 1..{n_layers - 1} (the model has {n_layers} layers; the last layer's "
                "policy is the full policy). Fix: pick a lower layer, e.g. the boundary layer from `ipolicy entropy`."
            )
        return k

    def _boundary_layer_of_first_rollouts(self) -> int:
        from ..lens.engine import EngineConfig, EntropyEngine
        from ..stats import boundary_layer, summarize

        groups = self.rollouts(1, self.prompts_for_step(1))
        tokenized = [TokenizedSample(g.sample, g.prompt_ids, r) for g in groups for r in g.responses if r]
        table = EntropyEngine(self.loaded, EngineConfig()).analyse(tokenized)
        k = boundary_layer(summarize(table))
        if k is None or k >= self.loaded.n_layers:
            raise IPolicyError(
                "`internal_layer` auto: the first rollouts show no FFN layer that raises entropy, so there is no "
                "boundary layer. Fix: give `internal_layer` K explicitly."
            )
        return k

    def _monitor_layer(self) -> int:
        n_layers = self.loaded.n_layers
        layer = self.config.monitor_layer or self.internal_layer or max(1, round(n_layers / 6))
        if not 1 <= layer <= n_layers:
            raise IPolicyError(f"`monitor_layer` must be in 1..{n_layers}, got {layer}. Fix: pass a layer number in that range.")
        return layer

    # ---------------------------------------------------------------- one step
    def prompts_for_step(self, step: int) -> list[int]:
        """This process's prompt indices for ``step`` (1-based)."""
        return prompts_for_step(step, len(self.samples), self.config.prompts_per_step, self.config.seed,
                                self.accelerator.process_index, self.accelerator.num_processes)

    def rollouts(self, step: int, indices: list[int]) -> list[Rollout]:
        """The groups of ``step``: sampled from the current model (seeded by step and process) and scored."""
        seed = self.config.seed * 1_000_003 + step * 101 + self.accelerator.process_index
        current = LoadedModel(**{**self.loaded.__dict__, "hf_model": self.model})
        return self.sampler(seed, indices, current, self.accelerator.autocast)

    def _policy_layer(self, step: int) -> int | None:
        return self.internal_layer if self.internal_layer and step <= self.config.internal_steps else None

    def train_step(self, step: int) -> dict:
        """Rollouts, then the update; returns the step's metrics (docs/definitions.md, metrics.jsonl)."""
        started = time.perf_counter()
        layer = self._policy_layer(step)
        groups = self.rollouts(step, self.prompts_for_step(step))
        rollout_seconds = time.perf_counter() - started
        stats = self.update(step, groups, layer)
        seconds = time.perf_counter() - started
        rewards = stats.pop("rewards")
        n_tokens, n_rows = stats.pop("n_tokens"), stats.pop("n_rows")
        return {
            "step": step,
            "phase": "internal" if layer else "full",
            "policy_layer": layer or self.loaded.n_layers,
            "reward_mean": float(rewards.mean()),
            "accuracy": float((rewards >= 1.0).float().mean()),
            "response_len_mean": n_tokens / n_rows,
            "entropy": stats.pop("entropy"),
            "internal_entropy": stats.pop("internal_entropy"),
            "monitor_layer": self.monitor_layer,
            **stats,
            "lr": self.optimizer.param_groups[0]["lr"],
            "step_seconds": seconds,
            "rollout_seconds": rollout_seconds,
            "tokens_per_second": n_tokens / seconds,
            "verifier_failures": getattr(self.reward_fn, "failures", 0),
        }

    # ---------------------------------------------------------------- run, save
    def run(self, progress: bool = True) -> list[dict]:
        """Train from the current step to ``config.steps``; returns the metrics of the steps run."""
        from tqdm.auto import tqdm

        rows = []
        if self.step >= self.config.steps:
            if self.accelerator.is_main_process:
                print(f"'{self.out}' is already at step {self.step} (`steps` {self.config.steps}): nothing to train.")
            return rows
        if self.accelerator.is_main_process and self.step == 0:
            self.folder.metrics_path.unlink(missing_ok=True)  # a run stopped before its first checkpoint starts again
            self._write_info()  # from the start, so that a stopped run is labelled for what it is
        bar = tqdm(range(self.step + 1, self.config.steps + 1), initial=self.step, total=self.config.steps,
                   desc="training", unit="step", disable=not progress or not self.accelerator.is_main_process)
        for step in bar:
            metrics = self.train_step(step)
            self.step = step
            rows.append(metrics)
            if self.accelerator.is_main_process:
                self._append_metrics(metrics)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", phase=metrics["phase"])
                if step % self.config.save_every == 0 or step == self.config.steps:
                    self.save_checkpoint(step)
            self.accelerator.wait_for_everyone()
        for writer in self.writers:
            writer.close()
        return rows

    def save_checkpoint(self, step: int) -> Path:
        """checkpoints/step-N (weights, tokenizer, trainer state) and run.json."""
        path = save_checkpoint(self.folder, step, self.model, self.tokenizer, self.optimizer,
                               {"internal_layer": self.internal_layer})
        self._write_info()
        return path

    def _write_info(self) -> None:
        """run.json: the base model, the options, the reward as resolved, the internal layer, and digests of the
        training prompts and the reward code (a resumed run must have the same)."""
        base = Path(self.config.model)
        base_model = str(base.resolve()) if base.exists() else self.config.model  # a run folder can move; a path cannot
        reward = self.config.resolved_reward
        self.folder.write_info({"base_model": base_model, "config": self.config.record(),
                                "reward": reward if isinstance(reward, str) else self.config.record()["reward"],
                                "internal_layer": self.internal_layer, "data_digest": samples_digest(self.samples),
                                "reward_code": reward_code(reward)})

    def _append_metrics(self, metrics: dict) -> None:
        path = self.folder.metrics_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
        for writer in self.writers:
            writer.log(metrics)

    def _drop_metrics_after_checkpoint(self) -> None:
        """On resume: the steps logged after the restored checkpoint will be redone, so their lines go."""
        path = self.folder.metrics_path
        if path.is_file():
            kept = [l for l in path.read_text().split("\n") if l.strip() and json.loads(l)["step"] <= self.step]
            atomic_write_text(path, "".join(l + "\n" for l in kept))

    def _loggers(self) -> list:
        writers = []
        if self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise IPolicyError("`tensorboard` needs the tensorboard package. Fix: pip install tensorboard") from error
            writer = SummaryWriter(str(self.out / "tensorboard"))
            writers.append(_Logger(lambda m: [writer.add_scalar(k, v, m["step"]) for k, v in m.items()
                                              if isinstance(v, (int, float))], writer.close))
        if self.config.wandb:
            try:
                import wandb
            except ImportError as error:
                raise IPolicyError("`wandb` needs the wandb package. Fix: pip install wandb") from error
            run = wandb.init(project="ipolicy", config=self.config.record(), dir=str(self.out))
            writers.append(_Logger(lambda m: run.log(m, step=m["step"]), run.finish))
        return writers


@dataclass
class _Logger:
    log: object
    close: object


def train(config: TrainConfig | None = None, *, out: str | Path, resume: bool = False, progress: bool = False,
          **options) -> TrainResult:
    """Train GRPO (or BuPO, when ``internal_steps`` > 0) into the run folder ``out`` (checkpoints/step-N/,
    metrics.jsonl, run.json); returns the run, every step's metrics included. ``config`` fields may be given as
    keywords (``train(internal_layer=5, internal_steps=2, out="runs/bupo")``). ``resume`` continues the run in
    ``out`` from its latest checkpoint, with the same options (only ``TrainConfig.RESUMABLE_CHANGES`` may differ)."""
    from dataclasses import replace

    config = replace(config, **options) if config is not None else TrainConfig(**options)
    if int(os.environ.get("RANK", "0")):  # under `accelerate launch`, the main process holds the folder's lock
        Trainer(config, out, resume=resume).run(progress=progress)
    else:
        with folder_lock(out):
            Trainer(config, out, resume=resume).run(progress=progress)
    return TrainResult.load(out)
