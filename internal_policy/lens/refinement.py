"""Feature refinement (docs/definitions.md §3, paper Fig. 5): how the trained layer k relates to every higher layer j.

Per analysed token: cos(h_k, h_j) of the raw residual states, and KL(pi(h_k) || pi(h_j)) of their policies (in nats,
through ``PolicyHead``; as everywhere in the project, layer L's policy is the model's real policy pi(LNf(h_L))).
"""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F

from ..data import TokenizedSample
from ..errors import IPolicyError
from .engine import EntropyEngine
from .states import policy_state_key


@torch.inference_mode()
def feature_refinement(engine: EntropyEngine, samples: list[TokenizedSample], layer: int, chunk: int = 256) -> pd.DataFrame:
    """Mean cos(h_k, h_j) and KL(pi(h_k) || pi(h_j)) for k = ``layer`` and j = k+1..L, in the engine's norm mode.

    Returns one row per j: layer_k, layer_j, cos_mean, kl_mean, n_tokens.
    """
    head, n_layers = engine.head, engine.loaded.n_layers
    if not 1 <= layer < n_layers:
        raise IPolicyError(f"`refine_layer` must be in 1..{n_layers - 1}, got {layer}. Fix: pick a layer below the last.")
    sums = {j: [0.0, 0.0] for j in range(layer + 1, n_layers + 1)}
    policy_key = {j: policy_state_key(j, n_layers, head.norm_mode) for j in [layer, *sums]}
    count = 0
    for batch in engine.batches(samples):
        ids, index = engine.inputs([samples[i] for i in batch])
        found = engine.states.residual_states(ids, None, set(range(layer, n_layers + 1)) | set(policy_key.values()))
        states = {key: x.reshape(-1, x.shape[-1]).index_select(0, index) for key, x in found.items()}
        for start in range(0, len(index), chunk):
            rows = slice(start, start + chunk)
            logp_k = torch.log_softmax(head.logits(states[policy_key[layer]][rows]).float(), dim=-1)
            p_k = logp_k.exp()
            for j in sums:
                logp_j = torch.log_softmax(head.logits(states[policy_key[j]][rows]).float(), dim=-1)
                sums[j][0] += F.cosine_similarity(states[layer][rows].float(), states[j][rows].float(), dim=-1).sum().item()
                sums[j][1] += (p_k * (logp_k - logp_j)).sum(-1).sum().item()
        count += len(index)
    return pd.DataFrame(
        [{"layer_k": layer, "layer_j": j, "cos_mean": c / count, "kl_mean": kl / count, "n_tokens": count}
         for j, (c, kl) in sums.items()]
    )
