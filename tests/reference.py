"""An independent, plain implementation of docs/definitions.md §1–2, for checking the engine (and as the benchmark baseline).

It uses nothing of the engine: PyTorch forward hooks on the Hugging Face modules, the full softmax of every state,
and the textbook entropy -sum p log p. Every state is unembedded where it is used (nothing shared), as the
straightforward implementation would.
"""

from __future__ import annotations

import pandas as pd
import torch


def layout(model) -> dict:
    """Where each state of the definitions lives in a Hugging Face model, by family (read off the modeling code): the
    decoder, its blocks, the final norm, and per block the (module, "in" | "out") whose input or output is each state:
    ``attn_in`` (what attention reads), ``attn_out`` (a_l, what it adds), ``ffn_stream`` (m_l, or h_{l-1} in a
    parallel block), ``ffn_in`` (what the FFN reads) and ``ffn_out`` (f_l, what it adds)."""
    if hasattr(model, "transformer"):  # GPT-2
        decoder = model.transformer
        return dict(decoder=decoder, layers=decoder.h, norm=decoder.ln_f, attn_in=("ln_1", "out"),
                    attn_out=("attn", "out"), ffn_stream=("ln_2", "in"), ffn_in=("ln_2", "out"), ffn_out=("mlp", "out"))
    if hasattr(model, "gpt_neox"):  # parallel blocks: both modules read h_{l-1}, through their own norms
        decoder = model.gpt_neox
        return dict(decoder=decoder, layers=decoder.layers, norm=decoder.final_layer_norm,
                    attn_in=("input_layernorm", "out"), attn_out=("attention", "out"),
                    ffn_stream=("post_attention_layernorm", "in"), ffn_in=("post_attention_layernorm", "out"),
                    ffn_out=("mlp", "out"))
    decoder = model.model
    block = decoder.layers[0]
    common = dict(decoder=decoder, layers=decoder.layers, norm=decoder.norm)
    if hasattr(block, "pre_feedforward_layernorm"):  # Gemma-2/3: pre- and post-norms; a_l and f_l after the post-norm
        return dict(common, attn_in=("input_layernorm", "out"), attn_out=("post_attention_layernorm", "out"),
                    ffn_stream=("pre_feedforward_layernorm", "in"), ffn_in=("pre_feedforward_layernorm", "out"),
                    ffn_out=("post_feedforward_layernorm", "out"))
    if not hasattr(block, "input_layernorm"):  # OLMo-2: no pre-norm, a post-norm after each module
        return dict(common, attn_in=("self_attn", "in"), attn_out=("post_attention_layernorm", "out"),
                    ffn_stream=("mlp", "in"), ffn_in=("mlp", "in"), ffn_out=("post_feedforward_layernorm", "out"))
    return dict(common, attn_in=("input_layernorm", "out"), attn_out=("self_attn", "out"),
                ffn_stream=("post_attention_layernorm", "in"), ffn_in=("post_attention_layernorm", "out"),
                ffn_out=("mlp", "out"))


def capture(block, where: tuple[str, str], store) -> object:
    """A hook on ``block``'s module ``where[0]`` that passes its input (the hidden states, positional or keyword) or
    its output (the first of a tuple) to ``store``; returns the handle."""
    module = getattr(block, where[0])
    if where[1] == "in":
        def before(m, args, kwargs):
            store(args[0] if args else kwargs["hidden_states"])

        return module.register_forward_pre_hook(before, with_kwargs=True)

    def after(m, inputs, output):  # returns None: the module's output is left alone
        store(_first(output))

    return module.register_forward_hook(after)


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


def reference_predictions(logits: torch.Tensor, targets: list[int], k: int) -> list[dict]:
    """What a policy predicts, textbook style, from full float64 logits [T, V]: per row the k most probable ids
    (sorted by probability, then by id), their probabilities, and the target's probability and rank (1 + the tokens
    more probable, or as probable with a lower id). Ordered by logit: probabilities far below the largest underflow
    to 0 even in float64, and would all look tied."""
    p = torch.softmax(logits.double(), dim=-1)
    out = []
    for row, z, target in zip(p, logits.double(), targets):
        order = torch.sort(-z, stable=True).indices.tolist()  # by logit, descending; equal logits: the lower id first
        scale = z.abs().max()
        gaps = (z - z[target]).abs() / scale
        gaps[target] = float("inf")
        top = z[order[: k + 1]]
        out.append(dict(top_ids=order[:k], top_probs=[row[j].item() for j in order[:k]],
                        token_prob=row[target].item(), token_rank=order.index(target) + 1,
                        nearest_gap=gaps.min().item(),  # how close another token's logit is to the target's
                        top_gap=((top[:-1] - top[1:]).abs().min() / scale).item()))  # and within the top k + 1
    return out


def reference_token_table(model, tokenizer, rows, norm_mode="none", dtype=torch.float64, token_ids=None,
                          top_k=None) -> pd.DataFrame:
    """Per-token entropies: rows are dicts with 'prompt' (str or messages) and 'response' (str).
    ``token_ids`` = [prompt_ids, response_ids] skips tokenization (one row). With ``top_k``, returns instead the
    predictions of every distinct state: one row per (sample, position, layer, state)."""
    model = model.to(dtype)
    parts = layout(model)
    final_norm, layers = parts["norm"], parts["layers"]
    records, predicted = [], []
    for index, row in enumerate(rows):
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
            store = lambda key, n=n: (lambda x: cache.__setitem__((key, n), x))  # noqa: E731
            handles += [
                capture(layer, parts["attn_in"], store("ln1")),
                capture(layer, parts["attn_out"], store("attn")),
                capture(layer, parts["ffn_stream"], store("mid")),
                capture(layer, parts["ffn_in"], store("ln2")),
                capture(layer, parts["ffn_out"], store("ffn")),
                layer.register_forward_hook(lambda m, i, o, n=n: cache.__setitem__(("out", n), _first(o))),
            ]
        with torch.no_grad():
            model(ids)
            for h in handles:
                h.remove()

            def logits_of(x):
                x = x[0, pos]
                if norm_mode == "final":
                    x = final_norm(x)
                return unembed(model, x)

            def H(x):
                return reference_entropy(logits_of(x))

            L = len(layers)
            if top_k:
                real_policy = unembed(model, final_norm(cache[("out", L - 1)][0, pos]))
                states = [("resid", 0, logits_of(cache["h0"]))]
                for n in range(L):
                    states += [("attn_in", n + 1, logits_of(cache[("ln1", n)])), ("attn_out", n + 1, logits_of(cache[("attn", n)])),
                               ("ffn_in", n + 1, logits_of(cache[("ln2", n)])), ("ffn_out", n + 1, logits_of(cache[("ffn", n)])),
                               ("resid", n + 1, real_policy if n == L - 1 else logits_of(cache[("out", n)]))]
                for state, layer, logits in states:
                    for t, found in enumerate(reference_predictions(logits, r_ids, top_k)):
                        predicted.append(dict(sample_index=index, position=pos[t], layer=layer, state=state, **found))
                continue
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
    return pd.DataFrame(predicted if top_k else records)


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
