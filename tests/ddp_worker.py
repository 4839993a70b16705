"""Run under `accelerate launch --num_processes 2`: a 2-step BuPO run, then each rank saves its parameters."""

import sys
from pathlib import Path

import torch

from internal_policy.trainer import TrainConfig, Trainer

out, model, data, reward = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
config = TrainConfig(model=model, data=data, reward=reward, steps=2, internal_layer=2, internal_steps=1, prompts_per_step=2,
                     group_size=4, max_new_tokens=8, lr=1e-3, save_every=1, seed=0, dtype="float32", device="cpu")
trainer = Trainer(config, out)
trainer.run(progress=False)
params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
torch.save(params, out / f"params-rank{trainer.accelerator.process_index}-of-{trainer.accelerator.num_processes}.pt")
