"""Residual states: the one place that reads h_l out of a model, by two routes.

* ``BridgeStates`` reads them through TransformerLens TransformerBridge hooks (``blocks.{l-1}.hook_resid_post``,
  ``ln_final.hook_out``): the entropy engine and refinement use these hook names, and the engine adds the module
  hooks of docs/definitions.md §1 to the same forward.
* ``residual_states`` reads them with plain forward hooks on the Hugging Face decoder blocks, stops the forward right
  after the highest block it needs (BuPO's training forward at layer K), takes a key/value cache, and stays
  differentiable: the trainer uses it, through ``response_states`` and ``ResponseForward``.

Both return ``{l: h_l}`` ([B, T, d], l = 1..L) and ``{LNF: LNf(h_L)}``, and the tests check that they agree on every
supported architecture. ``policy_state_key`` is the one place that knows that the last layer's policy is the model's
real policy pi(LNf(h_L)).

The trainer's forward also shares prompts: GRPO samples G responses per prompt, so each distinct prompt runs once,
fills a key/value cache, and the cache is indexed out to every response of its group (``index_select`` is
differentiable: the gradients of the G responses add up in the one prompt forward, exactly as in G separate
forwards). This removes (G - 1) / G of the prompt compute from the training forward.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..errors import IPolicyError

LNF = "lnf"  # the key of LNf(h_L): the final norm of the last block's output, what the model's own unembedding reads


def policy_state_key(layer: int, n_layers: int, norm_mode: str = "none") -> int | str:
    """Which state layer ``layer``'s internal layer policy reads: h_l (key ``layer``), except that the last layer's
    policy is the model's real policy pi(LNf(h_L)) (key ``LNF``). In norm mode "final" the policy head applies LNf to
    every state itself, so there the last layer reads h_L (LNf is never applied twice)."""
    return LNF if layer == n_layers and norm_mode == "none" else layer


class _StopForward(Exception):
    pass


@contextmanager
def fused_attention(bridge) -> Iterator[None]:
    """Run each attention bridge in its delegating mode (hook_in -> the HF module -> hook_out) for one forward.

    TransformerBridge's rotary attention re-implements softmax(QK^T) to expose hook_pattern, which costs
    [heads x T x T] floats per layer (0.8 GB at T = 3000 on SmolLM2). The engine reads no pattern, so it lets the
    Hugging Face module run its fused kernel (sdpa); hook_attn_out still sees the same a_l.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    patched = []
    for block in bridge.blocks:
        attn = getattr(block, "attn", None)
        if isinstance(attn, AttentionBridge) and type(attn).forward is not AttentionBridge.forward:
            # object.__setattr__: bridge components forward unknown attribute writes to the wrapped HF module
            object.__setattr__(attn, "forward", types.MethodType(AttentionBridge.forward, attn))
            patched.append(attn)
    try:
        yield
    finally:
        for attn in patched:
            object.__delattr__(attn, "forward")


class BridgeStates:
    """Residual states through TransformerBridge hooks (the route of the entropy engine)."""

    def __init__(self, bridge):
        self.bridge = bridge

    def forward(self, input_ids: Tensor, hooks: list, attention_mask: Tensor | None = None) -> None:
        """One bridge forward with ``hooks`` [(hook name, fn(states, hook))], attention in the model's fused kernel;
        the final [T x vocab] logits are never materialised (logits_to_keep=1)."""
        with self.bridge.hooks(fwd_hooks=hooks), fused_attention(self.bridge):
            self.bridge(input_ids, attention_mask=attention_mask, return_type=None, logits_to_keep=1, use_cache=False)

    # Per block layout (docs/definitions.md §1), the hook within ``blocks.{i}`` of each state the engine reads:
    # h_{l-1}; what attention reads and a_l, what it adds; the stream the FFN's input comes from (m_l, or h_{l-1} in a
    # parallel block), what the FFN reads and f_l, what it adds; h_l.
    LAYOUTS = {
        "pre-norm": dict(attn_in="ln1.hook_out", attn_out="hook_attn_out", ffn_stream="hook_resid_mid",
                         ffn_in="ln2.hook_out", ffn_out="hook_mlp_out"),
        # Gemma-2/3: a pre-norm and a post-norm around each module; a_l, f_l are what is added, after the post-norm
        "pre+post-norm": dict(attn_in="ln1.hook_out", attn_out="ln1_post.hook_out", ffn_stream="hook_resid_mid",
                              ffn_in="ln2.hook_out", ffn_out="ln2_post.hook_out"),
        # OLMo-2: no pre-norm, so each module reads the stream itself; a post-norm on its output
        "post-norm": dict(attn_in="hook_resid_pre", attn_out="ln1_post.hook_out", ffn_stream="hook_resid_mid",
                          ffn_in="hook_resid_mid", ffn_out="ln2_post.hook_out"),
        # GPT-NeoX (Pythia): attention and FFN both read h_{l-1}; h_l = h_{l-1} + a_l + f_l
        "parallel": dict(attn_in="ln1.hook_out", attn_out="hook_attn_out", ffn_stream="hook_resid_pre",
                         ffn_in="ln2.hook_out", ffn_out="hook_mlp_out"),
    }

    @staticmethod
    def block_hooks(block_layout: str) -> dict[str, str]:
        """The hook (within ``blocks.{i}``) of each state of docs/definitions.md §1 for a block layout (``LAYOUTS``):
        resid_pre, attn_in, attn_out, ffn_stream, ffn_in, ffn_out, resid_post."""
        return {"resid_pre": "hook_resid_pre", **BridgeStates.LAYOUTS[block_layout], "resid_post": "hook_resid_post"}

    @staticmethod
    def hook_name(key: int | str) -> str:
        """The bridge hook that sees state ``key``: h_0 -> blocks.0.hook_resid_pre, h_l -> blocks.{l-1}.hook_resid_post,
        LNF -> ln_final.hook_out."""
        if key == LNF:
            return "ln_final.hook_out"
        return "blocks.0.hook_resid_pre" if key == 0 else f"blocks.{key - 1}.hook_resid_post"

    def residual_states(self, input_ids: Tensor, attention_mask: Tensor | None, layers: set[int],
                        stop_after: int | None = None) -> dict:
        """{l: h_l [B, T, d]} for l in ``layers`` (1-based; 0 = the embeddings h_0 as block 1 reads them), plus
        {LNF: LNf(h_L)} unless the forward stops right after block ``stop_after``."""
        captured: dict = {}

        def keep(key):
            def hook(states, hook):
                captured[key] = states
                if key == stop_after:
                    raise _StopForward

            return hook

        keys = set(layers) | ({stop_after} if stop_after else set()) | ({LNF} if stop_after is None else set())
        try:
            self.forward(input_ids, [(self.hook_name(k), keep(k)) for k in keys], attention_mask)
        except _StopForward:
            pass
        return captured


def distinct_prompts(prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct prompts in first-seen order, and for each row the index of its prompt in that list."""
    position: dict[tuple[int, ...], int] = {}
    for ids in prompt_ids:
        position.setdefault(tuple(ids), len(position))
    return [list(p) for p in position], [position[tuple(ids)] for ids in prompt_ids]


def pad_rows(rows: list[list[int]], pad: int, left: bool = False, device=None) -> tuple[Tensor, Tensor]:
    """Token ids [B, max len] padded with ``pad`` (on the right, or the left) and the attention mask (1 = token)."""
    width = max(map(len, rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[b, span] = torch.tensor(row, dtype=torch.long)
        mask[b, span] = 1
    return ids.to(device), mask.to(device)


def cache_keyword(model) -> str:
    """The keyword that passes a key/value cache to this model's forward and ``generate``: newer transformers 5
    releases renamed ``past_key_values`` to ``cache`` (the old name warns)."""
    return "cache" if "cache" in inspect.signature(model.get_decoder().forward).parameters else "past_key_values"


def decoder_layers(model) -> nn.ModuleList:
    """The decoder's blocks in order: ``layers`` in Llama/Qwen-style models, ``h`` in GPT-2-style ones."""
    decoder = model.get_decoder()
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(decoder, name, None), nn.ModuleList):
            return getattr(decoder, name)
    raise IPolicyError(f"Cannot find the blocks of {type(decoder).__name__} (no 'layers' or 'h' list). "
                       "Fix: train a model with a standard decoder layout.")


def residual_states(model, input_ids: Tensor, attention_mask: Tensor, layers: set[int], stop_after: int | None = None,
                    position_ids: Tensor | None = None, cache=None) -> dict:
    """Residual states of a Hugging Face decoder in one forward: {l: h_l [B, T, d]} for l in ``layers`` (the output
    of layer l, 1-based; 0: the input of block 1), plus {LNF: LNf(h_L)} unless the forward stops right after
    layer ``stop_after``.
    ``cache`` (a transformers ``Cache``) is read and extended when given."""
    decoder = model.get_decoder()
    captured: dict = {}

    def hook_for(l):
        def hook(module, inputs, output):
            captured[l] = output[0] if isinstance(output, tuple) else output
            if l == stop_after:
                raise _StopForward

        return hook

    def embeddings(module, args, kwargs):
        captured[0] = args[0] if args else kwargs["hidden_states"]

    blocks = decoder_layers(model)
    wanted = set(layers) - {0} | ({stop_after} if stop_after else set())
    handles = [blocks[l - 1].register_forward_hook(hook_for(l)) for l in wanted]
    if 0 in layers:
        handles.append(blocks[0].register_forward_pre_hook(embeddings, with_kwargs=True))
    try:
        captured[LNF] = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=cache is not None, **{cache_keyword(model): cache}).last_hidden_state
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def response_states(model, rows: list[tuple[list[int], list[int]]], layers: set[int], stop_after: int | None = None,
                    pad: int = 0) -> dict:
    """The states that predict each response token, for every row (prompt ids, response ids).

    Returns {l: [N, d]} for l in ``layers`` and LNF (LNf(h_L), unless stopped after layer ``stop_after``), where
    N = total response tokens and row b's tokens come in order: the state at position t predicts response token t
    (the first from the prompt's last position). Differentiable; the prompt of repeated rows is computed once.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    prompts, prompt_of_row = distinct_prompts([p for p, _ in rows])
    prompt_ids, prompt_mask = pad_rows(prompts, pad, device=device)  # right padding: no query sees only padding
    cache = DynamicCache(config=model.config)
    at_prompt = residual_states(model, prompt_ids, prompt_mask, layers, stop_after, cache=cache)
    index = torch.tensor(prompt_of_row, device=device)
    last = prompt_mask.sum(-1) - 1  # each prompt's last position: its state predicts response token 0
    first_states = {k: v[torch.arange(len(prompts), device=device), last][index] for k, v in at_prompt.items()}

    # The response forward reads every response token but the last (which predicts nothing).
    inputs = [r[:-1] for _, r in rows]
    lengths = torch.tensor([len(r) for _, r in rows], device=device)
    if max(map(len, inputs), default=0) == 0:  # no response is longer than one token
        return {k: v[lengths > 0] for k, v in first_states.items()}
    cache.reorder_cache(index)
    response_ids, response_mask = pad_rows(inputs, pad, device=device)
    mask = torch.cat([prompt_mask[index], response_mask], dim=-1)
    positions = (last[index] + 1)[:, None] + torch.arange(response_ids.shape[1], device=device)
    at_response = residual_states(model, response_ids, mask, layers, stop_after, position_ids=positions, cache=cache)

    keep = torch.arange(response_ids.shape[1] + 1, device=device)[None, :] < lengths[:, None]  # [B, 1 + W]
    return {k: torch.cat([first_states[k][:, None], at_response[k]], dim=1)[keep] for k in first_states}


class ResponseForward(nn.Module):
    """``response_states`` of a model as a module, so that ``accelerate`` (DDP, FSDP) wraps exactly the forward that
    the loss runs. ``readout(states)`` runs inside the forward too: DDP requires every parameter that the loss uses
    (the unembedding, when it turns states into log-probs) to be used within the wrapped forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, rows: list[tuple[list[int], list[int]]], layers: set[int], stop_after: int | None = None,
                pad: int = 0, readout=None):
        """Returns the states of ``response_states``, and with ``readout`` the pair (states, readout(states))."""
        states = response_states(self.model, rows, layers, stop_after, pad)
        return states if readout is None else (states, readout(states))
