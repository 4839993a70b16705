"""Forward passes over (prompt, response) rows whose prompts repeat: each distinct prompt goes through the model once.

GRPO samples G responses per prompt. Instead of running the prompt G times, the prompt's forward fills a key/value
cache that is then indexed out to every response of its group (``index_select``, which is differentiable: in the
training forward the gradients of the G responses add up in the one prompt forward, exactly as in G separate
forwards). This removes (G - 1) / G of the prompt compute from the rollouts and from the training forward.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ..errors import IPolicyError


class _StopForward(Exception):
    pass


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
    of layer l, 1-based), plus {"final": LNf(h_L)} unless the forward stops right after layer ``stop_after``.
    ``cache`` (a transformers ``Cache``) is read and extended when given."""
    decoder = model.get_decoder()
    captured: dict = {}

    def hook_for(l):
        def hook(module, inputs, output):
            captured[l] = output[0] if isinstance(output, tuple) else output
            if l == stop_after:
                raise _StopForward

        return hook

    wanted = set(layers) | ({stop_after} if stop_after else set())
    handles = [decoder_layers(model)[l - 1].register_forward_hook(hook_for(l)) for l in wanted]
    try:
        captured["final"] = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
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

    Returns {l: [N, d]} for l in ``layers`` and "final" (LNf(h_L), unless stopped after layer ``stop_after``), where
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


def prefilled_cache(model, prompt_ids: Tensor, attention_mask: Tensor, repeats: int):
    """For generation: the key/value cache of left-padded distinct prompts [P, T] without their last token, each
    repeated ``repeats`` times along the batch, ready for ``generate`` on the repeated prompts (which then runs the
    last prompt token itself). Position ids follow ``generate``'s rule for left padding."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    model.get_decoder()(input_ids=prompt_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                        position_ids=positions[:, :-1], use_cache=True, **{cache_keyword(model): cache})
    cache.batch_repeat_interleave(repeats)
    return cache
