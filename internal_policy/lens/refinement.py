"""Feature refinement (docs/definitions.md §3, paper Fig. 5): how the trained layer k relates to every higher layer j.

Per analysed token: cos(h_k, h_j) of the raw residual states, and KL(pi(h_k) || pi(h_j)) of their policies (in nats,
through ``PolicyHead``; as everywhere in the project, layer L's policy is the model's real policy pi(LNf(h_L))).
"""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F

from ..data import TokenizedSample
from .engine import EntropyEngine
from ..errors import IPolicyError


@torch.inference_mode()
def feature_refinement(engine: EntropyEngine, samples: list[TokenizedSample], layer: int, chunk: int = 256) -> pd.DataFrame:
    """Mean cos(h_k, h_j) and KL(pi(h_k) || pi(h_j)) for k = ``layer`` and j = k+1..L.

    Returns one row per j: layer_k, layer_j, cos_mean, kl_mean, n_tokens.
    """
    head, n_layers = engine.head, engine.loaded.n_layers
    if not 1 <= layer < n_layers:
        raise IPolicyError(f"--refine-layer must be in 1..{n_layers - 1}, got {layer}. Fix: pick a layer below the last.")
    sums = {j: [0.0, 0.0] for j in range(layer + 1, n_layers + 1)}
    count = 0
    for batch in engine.batches(samples):
        ids, index = engine.inputs([samples[i] for i in batch])
        states: dict = {}

        def keep(l):
            def hook(x, hook):
                states[l] = x.reshape(-1, x.shape[-1]).index_select(0, index)

            return hook

        hooks = [(f"blocks.{l - 1}.hook_resid_post", keep(l)) for l in range(layer, n_layers + 1)]
        engine.forward(ids, hooks + [("ln_final.hook_out", keep("final"))])
        policy_state = {**states, n_layers: states["final"] if head.norm_mode == "none" else states[n_layers]}
        for start in range(0, len(index), chunk):
            rows = slice(start, start + chunk)
            logp_k = torch.log_softmax(head.logits(states[layer][rows]).float(), dim=-1)
            p_k = logp_k.exp()
            for j in sums:
                logp_j = torch.log_softmax(head.logits(policy_state[j][rows]).float(), dim=-1)
                sums[j][0] += F.cosine_similarity(states[layer][rows].float(), states[j][rows].float(), dim=-1).sum().item()
                sums[j][1] += (p_k * (logp_k - logp_j)).sum(-1).sum().item()
        count += len(index)
    return pd.DataFrame(
        [{"layer_k": layer, "layer_j": j, "cos_mean": c / count, "kl_mean": kl / count, "n_tokens": count}
         for j, (c, kl) in sums.items()]
    )
