"""A small GRPO / BuPO trainer (docs/definitions.md §4–5) on one machine, or several through ``accelerate launch``.

One step: take ``prompts_per_step`` prompts (a seeded order over epochs), sample ``group_size`` responses each from
the full model, score them, compute group-normalised advantages, then ``ppo_epochs`` passes of clipped-surrogate
updates over mini-batches (micro-batches accumulate gradients; the loss is the token mean over the mini-batch).

BuPO: for steps 1..S the log-probs come from the internal layer policy pi(h_K) (no norm, divided by the rollout
temperature) and the training forward stops after layer K, so only layers 1..K, the embeddings and the unembedding
get gradient; after S it is plain GRPO on the full policy.

Outputs under ``out``: ``checkpoints/step-N/`` (Hugging Face folder + ``trainer_state.pt``), ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..data import BUILTIN_ARITHMETIC, Sample, TokenizedSample, encode, load_samples, render_prompt
from ..errors import IPolicyError
from ..io import atomic_write_text
from ..models import DEFAULT_MODEL, LoadedModel, load_model
from .losses import clipped_policy_loss, group_advantages
from ..lens.policy import PolicyHead
from ..lens.states import ResponseForward
from .rewards import load_reward, score
from .generation import VLLM_FOR_TRAINING, SamplingConfig, VllmRollouts, check_rollouts, sample_with_entropy, vllm_available

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainConfig:
    model: str = DEFAULT_MODEL
    data: str = BUILTIN_ARITHMETIC
    data_limit: int | None = None
    reward: str = "math"
    steps: int = 10
    prompts_per_step: int = 4
    group_size: int = 8
    mini_batch_prompts: int | None = None  # default: all prompts of the step (one optimiser step per PPO epoch)
    micro_batch_size: int = 8  # sequences per forward/backward
    ppo_epochs: int = 1
    lr: float = 1e-6
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    scale_std: bool = True
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    save_every: int = 10
    internal_layer: int | str | None = None  # BuPO's K (1-based), "auto" = boundary layer of the first rollouts
    internal_steps: int = 0  # BuPO's S
    monitor_layer: int | None = None  # layer whose policy entropy is logged (default: K, or round(L/6) for GRPO)
    dtype: str = "auto"  # weights: auto = float32 (AdamW updates of ~1e-6 are below bfloat16's resolution)
    device: str = "auto"
    autocast: bool | None = None  # bfloat16 autocast of forwards and generation; None = on a GPU, off on the CPU
    rollouts: str = "transformers"  # or "vllm" (a GPU with vllm and trl installed)
    vllm_gpu_memory: float = 0.3  # fraction of GPU memory the colocated vLLM engine reserves (TRL's default)
    tensorboard: bool = False
    wandb: bool = False


@dataclass
class Rollout:
    """One prompt's group: token ids and rewards. response_ids include the EOS token when one was sampled."""

    sample: Sample
    prompt_ids: list[int]
    responses: list[list[int]]
    rewards: list[float]
    texts: list[str] = field(default_factory=list)
    entropies: list[Tensor | None] = field(default_factory=list)  # per response: the sampling policy's entropy per token


class Trainer:
    def __init__(self, config: TrainConfig, out: Path, resume: bool = False, loaded: LoadedModel | None = None):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        self.config, self.out = config, Path(out)
        self._validate_numbers()
        self.samples = load_samples(config.data, limit=config.data_limit, seed=config.seed)
        self.reward_fn = load_reward(config.reward)
        if config.reward == "math" and any(s.answer is None for s in self.samples):
            missing = next(s for s in self.samples if s.answer is None)
            raise IPolicyError(
                f"--reward math needs ground truths, but row '{missing.id}' of '{config.data}' has none. "
                "Fix: add 'answer' (or reward_model.ground_truth) to every row, or use a custom --reward."
            )
        self._check_out_folder(resume)
        check_rollouts(config.rollouts, config.rollouts != "vllm" or vllm_available(), VLLM_FOR_TRAINING)
        weights_dtype = "float32" if config.dtype == "auto" else config.dtype
        self.loaded = loaded or load_model(config.model, dtype=weights_dtype, device=config.device)
        self.tokenizer = self.loaded.tokenizer
        n_layers = self.loaded.n_layers
        self.prompt_ids = [encode(self.tokenizer, render_prompt(self.tokenizer, s.prompt)) for s in self.samples]
        self._check_lengths()
        score(self.reward_fn, self._prompt_text(0), "", self.samples[0].answer)  # a bad reward fails here, not mid-run
        # cpu=True makes a multi-process launch (accelerate launch / torchrun) use DDP over gloo on the CPU
        on_cpu = self.loaded.device.type == "cpu"
        autocast = config.autocast if config.autocast is not None else not on_cpu
        # BuPO's internal phase leaves the layers above K unused, which DDP must be told of (it costs a graph traversal)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=bool(config.internal_steps))
        self.accelerator = Accelerator(cpu=on_cpu, mixed_precision="bf16" if autocast else "no", kwargs_handlers=[ddp])
        for option, value in (("--prompts-per-step", config.prompts_per_step), ("--mini-batch-prompts", config.mini_batch_prompts)):
            if value and value % self.accelerator.num_processes:
                raise IPolicyError(
                    f"{option} {value} does not split evenly over {self.accelerator.num_processes} processes (each takes "
                    "whole groups, and all must take part in every update). Fix: use a multiple."
                )
        self.head = PolicyHead(self.loaded.unembed, temperature=config.temperature)
        model = self.loaded.hf_model
        model.train(False)  # no dropout in RL updates; gradients flow regardless
        model.requires_grad_(True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.policy, self.optimizer = self.accelerator.prepare(ResponseForward(model), optimizer)
        self.reference = None
        if config.kl_coef:
            reference = load_model(config.model, dtype=weights_dtype, device=str(self.loaded.device)).hf_model
            reference.requires_grad_(False)
            self.reference = ResponseForward(reference)
        self.vllm = None
        if config.rollouts == "vllm":
            sequences = config.prompts_per_step // self.accelerator.num_processes * config.group_size
            sampling = SamplingConfig(config.max_new_tokens, config.temperature, config.top_p, batch_size=sequences)
            self.vllm = VllmRollouts(self.model, self.accelerator, self.tokenizer, sampling, config.vllm_gpu_memory,
                                     context=max(map(len, self.prompt_ids)) + config.max_new_tokens)
        self.step = 0
        if resume:
            self._restore()  # also restores the internal layer, so `auto` does not sample again
        else:
            self.internal_layer = self._resolve_internal_layer(n_layers)
        self.monitor_layer = config.monitor_layer or self.internal_layer or max(1, round(n_layers / 6))
        if not 1 <= self.monitor_layer <= n_layers:
            raise IPolicyError(f"--monitor-layer must be in 1..{n_layers}, got {self.monitor_layer}.")
        self.writers = self._loggers()

    @property
    def model(self):
        """The Hugging Face model being trained (unwrapped from DDP/FSDP)."""
        return self.accelerator.unwrap_model(self.policy).model

    # ---------------------------------------------------------------- validation
    def _validate_numbers(self) -> None:
        c = self.config
        checks = [
            (c.steps >= 1, "--steps must be at least 1"),
            (c.prompts_per_step >= 1 and c.group_size >= 2, "--prompts-per-step must be >= 1 and --group-size >= 2"),
            (c.micro_batch_size >= 1 and c.ppo_epochs >= 1, "--micro-batch-size and --ppo-epochs must be >= 1"),
            (c.mini_batch_prompts is None or 1 <= c.mini_batch_prompts <= c.prompts_per_step,
             "--mini-batch-prompts must be in 1..--prompts-per-step"),
            (c.lr > 0 and c.max_new_tokens >= 1 and c.temperature > 0, "--lr, --max-new-tokens and --temperature must be > 0"),
            (0 <= c.clip_low < 1 and c.clip_high >= 0, "--clip-low must be in [0, 1) and --clip-high >= 0"),
            (c.save_every >= 1, "--save-every must be at least 1"),
            (0 < c.vllm_gpu_memory < 1, "--vllm-gpu-memory must be in (0, 1)"),
            (0 <= c.internal_steps <= c.steps, f"--internal-steps ({c.internal_steps}) must be in 0..--steps ({c.steps})"),
        ]
        for ok, message in checks:
            if not ok:
                raise IPolicyError(f"{message}. Fix: change that option.")

    def _resolve_internal_layer(self, n_layers: int) -> int | None:
        k = self.config.internal_layer
        if k is None:
            return None
        if k == "auto":
            return self._boundary_layer_of_first_rollouts()
        k = int(k)
        if not 1 <= k <= n_layers - 1:
            raise IPolicyError(
                f"--internal-layer {k} is outside 1..{n_layers - 1} (the model has {n_layers} layers; the last layer's "
                "policy is the full policy). Fix: pick a lower layer, e.g. the boundary layer from `ipolicy entropy`."
            )
        return k

    def _check_lengths(self) -> None:
        context = self.loaded.context_length
        for sample, ids in zip(self.samples, self.prompt_ids):
            if context is not None and len(ids) + self.config.max_new_tokens > context:
                raise IPolicyError(
                    f"Prompt '{sample.id}' ({len(ids)} tokens) plus --max-new-tokens {self.config.max_new_tokens} "
                    f"exceeds the model's context of {context}. Fix: lower --max-new-tokens or drop the row."
                )

    def _check_out_folder(self, resume: bool) -> None:
        has_run = (self.out / "metrics.jsonl").is_file() or (self.out / "checkpoints").is_dir()
        if has_run and not resume:
            raise IPolicyError(f"'{self.out}' already holds a training run. Fix: add --resume to continue it, or choose another --out.")
        if resume and not has_run:
            raise IPolicyError(f"--resume: '{self.out}' has no run to resume. Fix: drop --resume or check --out.")

    # ---------------------------------------------------------------- data
    def _prompt_text(self, index: int) -> str:
        return render_prompt(self.tokenizer, self.samples[index].prompt)

    def prompts_for_step(self, step: int) -> list[int]:
        """Indices of the prompts of ``step`` (1-based): a fresh seeded permutation per pass over the data."""
        n, per = len(self.samples), self.config.prompts_per_step
        out = []
        for position in range((step - 1) * per, step * per):
            epoch = position // n
            order = list(range(n))
            random.Random(self.config.seed * 1_000_003 + epoch).shuffle(order)
            out.append(order[position % n])
        shard = self.accelerator.process_index
        return out[shard:: self.accelerator.num_processes]

    # ---------------------------------------------------------------- rollouts
    def rollouts(self, step: int, indices: list[int]) -> list[Rollout]:
        c = self.config
        prompt_ids = [self.prompt_ids[i] for i in indices]
        sampling = SamplingConfig(c.max_new_tokens, c.temperature, c.top_p, batch_size=len(prompt_ids) * c.group_size,
                                  seed=c.seed * 1_000_003 + step * 101 + self.accelerator.process_index)
        if self.vllm is not None:
            responses = self.vllm.sample(prompt_ids, c.group_size)
            entropies = [None] * len(responses)
        else:
            unwrapped = LoadedModel(**{**self.loaded.__dict__, "hf_model": self.model})
            with self.accelerator.autocast():  # the same precision as the training forward
                responses, entropies = sample_with_entropy(unwrapped, prompt_ids, sampling, per_prompt=c.group_size)
        groups = []
        for j, i in enumerate(indices):
            members = slice(j * c.group_size, (j + 1) * c.group_size)
            texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses[members]]
            rewards = [score(self.reward_fn, self._prompt_text(i), t, self.samples[i].answer) for t in texts]
            groups.append(Rollout(self.samples[i], self.prompt_ids[i], responses[members], rewards, texts, entropies[members]))
        return groups

    def _boundary_layer_of_first_rollouts(self) -> int:
        from ..lens.engine import EngineConfig, EntropyEngine
        from ..stats import boundary_layer, summarize

        groups = self.rollouts(1, self.prompts_for_step(1))
        tokenized = [TokenizedSample(g.sample, g.prompt_ids, r) for g in groups for r in g.responses if r]
        table = EntropyEngine(self.loaded, EngineConfig()).analyse(tokenized)
        k = boundary_layer(summarize(table))
        n_layers = self.loaded.n_layers
        if k is None or k >= n_layers:
            raise IPolicyError(
                "--internal-layer auto: the first rollouts show no FFN layer that raises entropy, so there is no boundary "
                "layer. Fix: give --internal-layer K explicitly."
            )
        return k

    # ---------------------------------------------------------------- one step
    def _policy_layer(self, step: int) -> int | None:
        return self.internal_layer if self.internal_layer and step <= self.config.internal_steps else None

    def _phase_states(self, forward, rows, layer: int | None, keep: set[int] = frozenset(), readout=None):
        """Through ``forward`` (a ResponseForward, maybe wrapped by accelerate), for the response tokens of ``rows``,
        [N, d] each: the states of the phase's policy (h_K, or LNf(h_L) when layer is None), and {l: h_l} for the
        layers in ``keep``. The forward stops at the highest layer it needs. With ``readout``: (states, its result)."""
        wanted = set(keep) | ({layer} if layer else set())
        out = forward(rows, wanted, max(wanted) if layer else None, self.tokenizer.pad_token_id or 0, readout)
        return out if readout else (out[layer or "final"], out)

    @torch.no_grad()
    def _sampling_entropy(self, groups: list[Rollout], rows) -> float:
        """The sampling (full) policy's entropy, token mean over the rollouts: as recorded during generation, or, where
        the rollout backend records none (vLLM), from a forward pass of the model as it sampled (before the update)."""
        recorded = [h for g in groups for h in g.entropies]
        if recorded and all(h is not None for h in recorded):
            return float(torch.cat(recorded).mean())
        forward = self.accelerator.unwrap_model(self.policy)
        entropies = [self.head.entropy(self._phase_states(forward, rows[start : start + self.config.micro_batch_size], None)[0])
                     for start in range(0, len(rows), self.config.micro_batch_size)]
        return float(torch.cat(entropies).mean())

    def _token_normaliser(self, local_tokens: int) -> float:
        """The loss divisor that makes the update the token mean over the whole mini-batch: with P processes, DDP
        averages the P gradients, so each divides its token sum by (all processes' tokens) / P."""
        if self.accelerator.num_processes == 1:
            return max(1, local_tokens)
        total = self.accelerator.reduce(torch.tensor(float(local_tokens), device=self.accelerator.device), "sum")
        return max(1.0, float(total)) / self.accelerator.num_processes

    def _log_probs_of(self, layer: int | None, targets: Tensor):
        """The training readout: log-probs of ``targets`` under the phase's policy, and its entropy when the loss has
        an entropy bonus (else None). Differentiable."""
        def readout(states: dict):
            phase = states[layer or "final"]
            if self.config.entropy_coef:
                return self.head.log_probs_and_entropy(phase, targets)
            return self.head.log_probs(phase, targets), None

        return readout

    def _targets(self, rows) -> Tensor:
        return torch.tensor([t for _, r in rows for t in r], device=self.loaded.device)

    @torch.no_grad()
    def _old_log_probs(self, rows, layer: int | None) -> list[dict]:
        """Per micro-batch, before the update: log-probs under the phase's policy, the reference's (KL), and the
        logged entropy of the monitored layer's policy."""
        out = []
        forward = self.accelerator.unwrap_model(self.policy)
        for start in range(0, len(rows), self.config.micro_batch_size):
            chunk = rows[start : start + self.config.micro_batch_size]
            phase, states = self._phase_states(forward, chunk, layer, keep={self.monitor_layer})
            out.append(self._before_update(chunk, layer, self.head.log_probs(phase, self._targets(chunk)), states))
        return out

    @torch.no_grad()
    def _before_update(self, rows, layer: int | None, logp: Tensor, states: dict) -> dict:
        """What the update compares against for these rows: the phase policy's log-probs, the reference's (KL), and
        the logged entropy of the monitored layer's policy."""
        return dict(logp=logp.detach(), ref=self._reference_log_probs(rows, layer),
                    internal_entropy=self.head.entropy(states[self.monitor_layer].detach()))

    @torch.no_grad()
    def _reference_log_probs(self, rows, layer: int | None):
        """log-probs of the frozen base model's policy of the same phase (for the KL penalty), or None."""
        if self.reference is None:
            return None
        with self.accelerator.autocast():  # the precision of the policy's forward
            states, _ = self._phase_states(self.reference, rows, layer)
        return self.head.log_probs(states, self._targets(rows))

    def train_step(self, step: int) -> dict:
        c = self.config
        started = time.perf_counter()
        layer = self._policy_layer(step)
        groups = self.rollouts(step, self.prompts_for_step(step))
        rollout_seconds = time.perf_counter() - started

        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
        advantages = group_advantages(rewards, scale_std=c.scale_std)
        rows = [(g.prompt_ids, r) for g in groups for r in g.responses]
        sampling_entropy = self._sampling_entropy(groups, rows)  # before the update changes the policy
        row_advantage = advantages.flatten().tolist()
        # On-policy (one epoch, one mini-batch): before the update the old log-probs equal the new ones, so the
        # separate no-grad pass is skipped and old = new.detach() from the training forward, in both phases.
        mini_prompts = (c.mini_batch_prompts // self.accelerator.num_processes) if c.mini_batch_prompts else len(groups)
        on_policy = c.ppo_epochs == 1 and mini_prompts >= len(groups)
        old = [] if on_policy else self._old_log_probs(rows, layer)
        micro = c.micro_batch_size
        old_by_row = {}
        for chunk_index, chunk in enumerate(old):
            offset = 0
            for row in range(chunk_index * micro, min(len(rows), (chunk_index + 1) * micro)):
                n = len(rows[row][1])
                old_by_row[row] = {k: (None if v is None else v[offset : offset + n]) for k, v in chunk.items()}
                offset += n

        stats = dict(clip_frac=[], approx_kl=[], kl_ref=[], grad_norm=[])
        for _ in range(c.ppo_epochs):
            for first in range(0, len(groups), mini_prompts):
                mini_rows = list(range(first * c.group_size, min(len(groups), first + mini_prompts) * c.group_size))
                normaliser = self._token_normaliser(sum(len(rows[r][1]) for r in mini_rows))
                for start in range(0, len(mini_rows), micro):
                    chosen = mini_rows[start : start + micro]
                    chunk = [rows[r] for r in chosen]
                    tgt = self._targets(chunk)
                    keep = {self.monitor_layer} if on_policy else set()
                    captured, (logp, entropy) = self._phase_states(self.policy, chunk, layer, keep=keep,
                                                                   readout=self._log_probs_of(layer, tgt))
                    if on_policy:
                        old.append(self._before_update(chunk, layer, logp, captured))
                        old_logp, ref = old[-1]["logp"], old[-1]["ref"]
                    else:
                        old_logp = torch.cat([old_by_row[r]["logp"] for r in chosen])
                        ref = torch.cat([old_by_row[r]["ref"] for r in chosen]) if self.reference is not None else None
                    adv = torch.cat([torch.full((len(rows[r][1]),), row_advantage[r]) for r in chosen]).to(logp.device)
                    terms = clipped_policy_loss(
                        logp, old_logp, adv, normaliser, c.clip_low, c.clip_high, ref, c.kl_coef, entropy, c.entropy_coef
                    )
                    self.accelerator.backward(terms.loss)
                    stats["clip_frac"].append(terms.clip_frac)
                    stats["approx_kl"].append(terms.approx_kl)
                    stats["kl_ref"].append(terms.kl_to_reference)
                grad_norm = self.accelerator.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
                if not torch.isfinite(grad_norm):  # the same on every process: DDP all-reduced the gradients
                    raise IPolicyError(
                        f"Step {step}: the gradient is not finite (the loss diverged), so the update was not applied and "
                        "no checkpoint of this step is written. Fix: lower --lr (or --clip-high) and train into a new --out."
                    )
                stats["grad_norm"].append(float(grad_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)

        seconds = time.perf_counter() - started
        n_tokens = sum(len(r) for _, r in rows)
        mean = lambda xs: float(sum(xs) / len(xs)) if xs else 0.0  # noqa: E731
        return {
            "step": step,
            "phase": "internal" if layer else "full",
            "policy_layer": layer or self.loaded.n_layers,
            "reward_mean": float(rewards.mean()),
            "accuracy": float((rewards >= 1.0).float().mean()),
            "response_len_mean": n_tokens / len(rows),
            "entropy": sampling_entropy,
            "internal_entropy": float(torch.cat([o["internal_entropy"] for o in old]).mean()),
            "monitor_layer": self.monitor_layer,
            "clip_frac": mean(stats["clip_frac"]),
            "approx_kl": mean(stats["approx_kl"]),
            "kl_to_reference": mean(stats["kl_ref"]),
            "grad_norm": mean(stats["grad_norm"]),
            "lr": self.optimizer.param_groups[0]["lr"],
            "step_seconds": seconds,
            "rollout_seconds": rollout_seconds,
            "tokens_per_second": n_tokens / seconds,
            "verifier_failures": getattr(self.reward_fn, "failures", 0),
        }

    # ---------------------------------------------------------------- run, save, resume
    def run(self, progress: bool = True) -> list[dict]:
        from tqdm.auto import tqdm

        rows = []
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

    def _append_metrics(self, metrics: dict) -> None:
        path = self.out / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
        for writer in self.writers:
            writer.log(metrics)

    def save_checkpoint(self, step: int) -> Path:
        """checkpoints/step-N: save_pretrained (safetensors) + tokenizer + trainer_state.pt, renamed into place."""
        final = self.out / "checkpoints" / f"step-{step}"
        staging = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        self.model.save_pretrained(staging, safe_serialization=True)
        self.tokenizer.save_pretrained(staging)
        torch.save(
            {
                "step": step,
                "optimizer": self.optimizer.state_dict(),
                "torch_rng": torch.random.get_rng_state(),
                "python_rng": random.getstate(),
                "config": asdict(self.config),
                "internal_layer": self.internal_layer,
            },
            staging / STATE_FILE,
        )
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        base = Path(self.config.model)
        base_model = str(base.resolve()) if base.exists() else self.config.model  # a run folder can move; a path cannot
        atomic_write_text(self.out / "run.json", json.dumps({"base_model": base_model, "config": asdict(self.config),
                                                             "internal_layer": self.internal_layer}, indent=2, default=str))
        return final

    def _restore(self) -> None:
        from safetensors.torch import load_model as load_safetensors

        checkpoints = sorted((self.out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        if not checkpoints:
            raise IPolicyError(f"--resume: '{self.out}/checkpoints' has no checkpoint. Fix: rerun without --resume into a new --out.")
        latest = checkpoints[-1]
        state = torch.load(latest / STATE_FILE, weights_only=False)
        shards = sorted(latest.glob("*.safetensors"))
        for shard in shards:
            load_safetensors(self.model, shard, strict=len(shards) == 1)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.random.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.step = state["step"]
        self.internal_layer = state["internal_layer"]
        metrics = self.out / "metrics.jsonl"
        if metrics.is_file():  # drop the steps after the checkpoint: they will be redone
            kept = [l for l in metrics.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= self.step]
            atomic_write_text(metrics, "".join(l + "\n" for l in kept))

    def _loggers(self) -> list:
        writers = []
        if self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise IPolicyError("--tensorboard needs the tensorboard package. Fix: pip install tensorboard") from error
            writer = SummaryWriter(str(self.out / "tensorboard"))
            writers.append(_Logger(lambda m: [writer.add_scalar(k, v, m["step"]) for k, v in m.items()
                                              if isinstance(v, (int, float))], writer.close))
        if self.config.wandb:
            try:
                import wandb
            except ImportError as error:
                raise IPolicyError("--wandb needs the wandb package. Fix: pip install wandb") from error
            run = wandb.init(project="ipolicy", config=asdict(self.config), dir=str(self.out))
            writers.append(_Logger(lambda m: run.log(m, step=m["step"]), run.finish))
        return writers


@dataclass
class _Logger:
    log: object
    close: object


def train(config: TrainConfig, out: Path, resume: bool = False, progress: bool = True) -> list[dict]:
    """Build the trainer (every check runs before the first step) and train."""
    return Trainer(config, out, resume=resume).run(progress=progress)
