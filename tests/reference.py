"""An independent, plain implementation of docs/definitions.md §1–2, for checking the engine (and as the benchmark baseline).

It uses nothing of the engine: PyTorch forward hooks on the Hugging Face modules, the full softmax of every state,
and the textbook entropy -sum p log p. Every state is unembedded where it is used (nothing shared), as the
straightforward implementation would.
"""

from __future__ import annotations

import pandas as pd
import torch


def layout(model) -> dict:
    """Where each state of the definitions lives in a Hugging Face model, by family (read off the modeling code):
    the decoder, its blocks, the final norm, and per block the modules whose output is LN1(h), a_l, LN2(m_l) (its
    input is m_l) and f_l."""
    if hasattr(model, "transformer"):  # GPT-2
        decoder = model.transformer
        return dict(decoder=decoder, layers=decoder.h, norm=decoder.ln_f, ln1="ln_1", attn_out="attn", ln2="ln_2",
                    ffn_out="mlp")
    decoder = model.model
    common = dict(decoder=decoder, layers=decoder.layers, norm=decoder.norm, ln1="input_layernorm")
    if hasattr(decoder.layers[0], "pre_feedforward_layernorm"):  # Gemma-2/3: post-norms, a_l and f_l after them
        return dict(common, attn_out="post_attention_layernorm", ln2="pre_feedforward_layernorm",
                    ffn_out="post_feedforward_layernorm")
    return dict(common, attn_out="self_attn", ln2="post_attention_layernorm", ffn_out="mlp")


def unembed(model, x: torch.Tensor) -> torch.Tensor:
    """The model's own logits of state x: lm_head, then its final soft-capping (Gemma-2) where it has one."""
    logits = model.lm_head(x)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


def reference_entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits, dim=-1)
    return -(p * torch.log(p)).nan_to_num().sum(-1)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def reference_token_table(model, tokenizer, rows, norm_mode="none", dtype=torch.float64, token_ids=None) -> pd.DataFrame:
    """Per-token entropies: rows are dicts with 'prompt' (str or messages) and 'response' (str).
    ``token_ids`` = [prompt_ids, response_ids] skips tokenization (one row)."""
    model = model.to(dtype)
    parts = layout(model)
    final_norm, layers = parts["norm"], parts["layers"]
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
        handles = [layers[0].register_forward_pre_hook(
            lambda m, a, k: cache.__setitem__("h0", a[0] if a else k["hidden_states"]), with_kwargs=True)]
        for n, layer in enumerate(layers):
            module = lambda name: getattr(layer, parts[name])  # noqa: E731
            handles += [
                module("ln1").register_forward_hook(lambda m, i, o, n=n: cache.__setitem__(("ln1", n), o)),
                module("attn_out").register_forward_hook(lambda m, i, o, n=n: cache.__setitem__(("attn", n), _first(o))),
                module("ln2").register_forward_hook(lambda m, i, o, n=n: cache.update({("ln2", n): o, ("mid", n): i[0]})),
                module("ffn_out").register_forward_hook(lambda m, i, o, n=n: cache.__setitem__(("ffn", n), _first(o))),
                layer.register_forward_hook(lambda m, i, o, n=n: cache.__setitem__(("out", n), _first(o))),
            ]
        with torch.no_grad():
            model(ids)
            for h in handles:
                h.remove()

            def H(x):
                x = x[0, pos]
                if norm_mode == "final":
                    x = final_norm(x)
                return reference_entropy(unembed(model, x))

            L = len(layers)
            for n in range(L):
                h_in = H(cache["h0"] if n == 0 else cache[("out", n - 1)])
                if n == L - 1:
                    h_out = reference_entropy(unembed(model, final_norm(cache[("out", n)][0, pos])))
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
    parts = layout(model)
    decoder_layers, final_norm = parts["layers"], parts["norm"]
    L = len(decoder_layers)
    sums = {j: [0.0, 0.0] for j in range(layer_k + 1, L + 1)}
    count = 0
    for row in rows:
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        pos = list(range(len(p_ids) - 1, len(p_ids) + len(r_ids) - 1))
        outputs = {}
        handles = [layer.register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n + 1, _first(o)))
                   for n, layer in enumerate(decoder_layers)]
        with torch.no_grad():
            model(torch.tensor([p_ids + r_ids]))
        for h in handles:
            h.remove()
        h_k = outputs[layer_k][0, pos]
        logp_k = torch.log_softmax(unembed(model, h_k), -1)
        for j in sums:
            h_j = outputs[j][0, pos]
            policy_j = final_norm(h_j) if j == L else h_j
            logp_j = torch.log_softmax(unembed(model, policy_j), -1)
            sums[j][0] += torch.cosine_similarity(h_k, h_j, dim=-1).sum().item()
            sums[j][1] += (logp_k.exp() * (logp_k - logp_j)).sum().item()
        count += len(pos)
    return pd.DataFrame([{"layer_j": j, "cos_ref": c / count, "kl_ref": kl / count} for j, (c, kl) in sums.items()])
