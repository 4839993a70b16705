"""An independent, plain implementation of docs/definitions.md §1–2, for checking the engine (and as the benchmark baseline).

It uses nothing of the engine: PyTorch forward hooks on the Hugging Face modules, the full softmax of every state,
and the textbook entropy -sum p log p. Every state is unembedded where it is used (nothing shared), as the
straightforward implementation would.
"""

from __future__ import annotations

import pandas as pd
import torch


def _decoder(model):
    return model.model


def reference_entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits, dim=-1)
    return -(p * torch.log(p)).nan_to_num().sum(-1)


def reference_token_table(model, tokenizer, rows, norm_mode="none", dtype=torch.float64, token_ids=None) -> pd.DataFrame:
    """Per-token entropies: rows are dicts with 'prompt' (str or messages) and 'response' (str).
    ``token_ids`` = [prompt_ids, response_ids] skips tokenization (one row)."""
    model = model.to(dtype)
    decoder = _decoder(model)
    final_norm, lm_head = decoder.norm, model.lm_head
    layers = decoder.layers
    records = []
    for row in rows:
        if token_ids is not None:
            p_ids, r_ids = token_ids
        else:
            prompt = row["prompt"]
            if not isinstance(prompt, str):
                prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            r_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + r_ids])
        pos = list(range(len(p_ids) - 1, len(p_ids) + len(r_ids) - 1))
        cache = {}
        handles = [decoder.embed_tokens.register_forward_hook(lambda m, i, o: cache.__setitem__("h0", o))]
        for n, layer in enumerate(layers):
            handles += [
                layer.input_layernorm.register_forward_hook(lambda m, i, o, n=n: cache.__setitem__(("ln1", n), o)),
                layer.self_attn.register_forward_hook(lambda m, i, o, n=n: cache.__setitem__(("attn", n), o[0])),
                layer.post_attention_layernorm.register_forward_hook(
                    lambda m, i, o, n=n: cache.update({("ln2", n): o, ("mid", n): i[0]})
                ),
                layer.mlp.register_forward_hook(lambda m, i, o, n=n: cache.__setitem__(("ffn", n), o)),
                layer.register_forward_hook(
                    lambda m, i, o, n=n: cache.__setitem__(("out", n), o[0] if isinstance(o, tuple) else o)
                ),
            ]
        with torch.no_grad():
            model(ids)
            for h in handles:
                h.remove()

            def H(x):
                x = x[0, pos]
                if norm_mode == "final":
                    x = final_norm(x)
                return reference_entropy(lm_head(x))

            L = len(layers)
            for n in range(L):
                h_in = H(cache["h0"] if n == 0 else cache[("out", n - 1)])
                if n == L - 1:
                    h_out = reference_entropy(lm_head(final_norm(cache[("out", n)][0, pos])))
                else:
                    h_out = H(cache[("out", n)])
                h_prev = cache["h0"] if n == 0 else cache[("out", n - 1)]
                cos_attn = torch.cosine_similarity(cache[("attn", n)][0, pos], h_prev[0, pos], dim=-1)
                cos_ffn = torch.cosine_similarity(cache[("ffn", n)][0, pos], cache[("mid", n)][0, pos], dim=-1)
                for module, a, b, c in (
                    ("layer", h_in, h_out, None),
                    ("attn", H(cache[("ln1", n)]), H(cache[("attn", n)]), cos_attn),
                    ("ffn", H(cache[("ln2", n)]), H(cache[("ffn", n)]), cos_ffn),
                ):
                    for t in range(len(pos)):
                        records.append(
                            dict(layer=n + 1, module=module, entropy_in=a[t].item(), entropy_out=b[t].item(),
                                 cos_resid=float("nan") if c is None else c[t].item())
                        )
    return pd.DataFrame(records)


def reference_summary(model, tokenizer, rows, norm_mode="none", dtype=torch.float64) -> pd.DataFrame:
    table = reference_token_table(model, tokenizer, rows, norm_mode, dtype)
    table["delta"] = table.entropy_out - table.entropy_in
    return (
        table.groupby(["layer", "module"])
        .agg(entropy_in_mean=("entropy_in", "mean"), entropy_out_mean=("entropy_out", "mean"),
             delta_mean=("delta", "mean"), n_tokens=("delta", "size"), cos_resid_mean=("cos_resid", "mean"))
        .reset_index()
    )


def reference_refinement(model, tokenizer, rows, layer_k: int) -> pd.DataFrame:
    """cos(h_k, h_j) and KL(pi(h_k) || pi(h_j)) for j > k, token means, float64; pi(h_L) is the real policy."""
    model = model.to(torch.float64)
    decoder, lm_head = _decoder(model), model.lm_head
    L = len(decoder.layers)
    sums = {j: [0.0, 0.0] for j in range(layer_k + 1, L + 1)}
    count = 0
    for row in rows:
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        pos = list(range(len(p_ids) - 1, len(p_ids) + len(r_ids) - 1))
        with torch.no_grad():
            out = model(torch.tensor([p_ids + r_ids]), output_hidden_states=True)
        outputs = {}
        handles = [layer.register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n + 1, o[0] if isinstance(o, tuple) else o))
                   for n, layer in enumerate(decoder.layers)]
        with torch.no_grad():
            model(torch.tensor([p_ids + r_ids]))
        for h in handles:
            h.remove()
        del out
        h_k = outputs[layer_k][0, pos]
        logp_k = torch.log_softmax(lm_head(h_k), -1)
        for j in sums:
            h_j = outputs[j][0, pos]
            policy_j = decoder.norm(h_j) if j == L else h_j
            logp_j = torch.log_softmax(lm_head(policy_j), -1)
            sums[j][0] += torch.cosine_similarity(h_k, h_j, dim=-1).sum().item()
            sums[j][1] += (logp_k.exp() * (logp_k - logp_j)).sum().item()
        count += len(pos)
    return pd.DataFrame([{"layer_j": j, "cos_ref": c / count, "kl_ref": kl / count} for j, (c, kl) in sums.items()])
