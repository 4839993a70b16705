"""Run under `accelerate launch --num_processes 2`: a 2-step run, then each rank saves its parameters.

Variant "bupo": one internal step (K = 2), then one full step, each with two mini-batches and two PPO epochs (four
optimiser steps per step, the off-policy path). Variant "grpo-minibatches": GRPO the same way."""

import sys
from pathlib import Path

import torch

from internal_policy.rl.trainer import TrainConfig, Trainer

out, model, data, reward, variant = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
options = dict(prompts_per_step=4, mini_batch_prompts=2, ppo_epochs=2)
options |= {"bupo": dict(internal_layer=2, internal_steps=1), "grpo-minibatches": {}}[variant]
config = TrainConfig(model=model, data=data, reward=reward, steps=2, group_size=4, max_new_tokens=8, lr=1e-3, save_every=1,
                     seed=0, dtype="float32", device="cpu", **options)
trainer = Trainer(config, out)
trainer.run(progress=False)
params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
torch.save(params, out / f"params-rank{trainer.accelerator.process_index}-of-{trainer.accelerator.num_processes}.pt")
