"""The interactive per-token view of an entropy result: one self-contained HTML page (no network, no CDN).

The response tokens run down the page and the layers across it; each cell is coloured by the entropy of a chosen
policy (the layer output h_l, the attention output a_l or the FFN output f_l) or by its entropy change ΔH, and
hovering it shows that policy's top-k tokens with their probabilities and the sampled token's probability and rank
(docs/definitions.md §1). Selectors switch the sample and, across checkpoints, the checkpoint.

The page embeds only what it shows: per token and layer the in and out entropies of the three modules and the
predictions of their three output policies, as base64 typed arrays decoded one sample at a time, and the text of the
token ids they name. Text from models and data reaches the page as JSON (with ``<``, ``>`` and ``&`` escaped, so no
string can close the script element) and is put into the page with ``textContent`` only, never parsed as HTML; a
Content-Security-Policy forbids every network request.
"""

from __future__ import annotations

import base64
import html
import json
from contextlib import nullcontext
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd

from .config import DEFINITIONS_URL
from .errors import IPolicyError
from .io import atomic_write_text

MODULES = ("layer", "attn", "ffn")  # the order of the page's arrays
OUTPUT_STATE = {"attn": "attn_out", "ffn": "ffn_out"}  # the policy a module's output is; "layer": resid of layer l


@dataclass
class ViewPage:
    """A view not written to a file: ``html`` is the page; a notebook shows it inline (in an iframe, so that its
    script and style stay its own)."""

    html: str

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.html, quote=True)}" style="width: 100%; height: 680px; '
                'border: 1px solid #ddd" sandbox="allow-scripts"></iframe>')

    def save(self, path: str | Path) -> Path:
        """Write the page to ``path`` (a folder: ``path/view.html``); returns the file written."""
        path = view_path(path)
        atomic_write_text(path, self.html)
        return path


def view_path(out: str | Path) -> Path:
    """The file a view written to ``out`` lands in: ``out`` itself (an .html file in an existing folder), or
    ``out/view.html`` when ``out`` is a folder."""
    path = Path(out)
    if path.is_dir():
        return path / "view.html"
    if path.suffix.lower() not in (".html", ".htm"):
        raise IPolicyError(f"`out` '{path}' is not an .html file; the view would replace it. Fix: give a name "
                           "ending in .html, or a folder.")
    if not path.parent.is_dir():
        raise IPolicyError(f"`out`: the folder '{path.parent}' does not exist. Fix: create it, or give another path.")
    return path


def write_view(result, out: str | Path | None = None, samples: int | None = None) -> Path | ViewPage:
    """The view of ``result`` (an ``EntropyResult``): written to ``out`` (a file, or a folder for ``view.html`` in it;
    returns the file's path), or a ``ViewPage``. Written into the result's own folder, it holds that folder's one
    writer's lock, so it never interleaves with a run writing there.
    ``samples``: how many samples it holds, the first ones (default: 8, or 8 sample-checkpoints across
    checkpoints)."""
    from .runs import folder_lock

    path = None if out is None else view_path(out)  # a bad `out` is named before the page is rendered
    page = ViewPage(render(view_data(result, samples)))
    if path is None:
        return page
    inside = result.out is not None and path.parent.resolve() == Path(result.out).resolve()
    with folder_lock(result.out) if inside else nullcontext():
        return page.save(path)


def view_data(result, samples: int | None = None) -> dict:
    """Everything the page shows, as JSON-able data (the arrays base64-encoded)."""
    tokens = result.tokens
    steps = (list(tokens[["step", "checkpoint"]].drop_duplicates().sort_values("step", kind="stable")
                  .itertuples(index=False, name=None)) if "step" in tokens else [(None, None)])
    available = sorted(tokens["sample_index"].unique())
    if samples is None:
        samples = max(1, 8 // len(steps))
    if samples < 1:
        raise IPolicyError(f"`samples` must be at least 1, got {samples}. Fix: pass 1 or more.")
    chosen = available[:samples]
    n_layers = int(tokens["layer"].max())
    predictions = result.prediction_table
    top_k = 0 if predictions is None else predictions.schema.field("top_ids").type.list_size
    by_index = {i: s for i, s in enumerate(result.samples)}
    arrays, vocab_ids = [], set()
    for _, checkpoint in steps:
        per_sample = []
        for index in chosen:
            encoded, ids, token_ids = _sample_arrays(tokens, predictions, index, checkpoint, n_layers, top_k)
            vocab_ids |= set(ids.tolist()) | set(token_ids.tolist())
            per_sample.append(encoded)
        arrays.append(per_sample)
    vocabulary = result.vocabulary if result.vocabulary is not None else _vocabulary_from(tokens)
    vocab = {str(int(i)): t for i, t in zip(vocabulary["token_id"], vocabulary["text"]) if int(i) in vocab_ids}
    meta = result.manifest["checkpoints"][-1] if "checkpoints" in result.manifest else result.manifest
    sample_rows = []
    for index in chosen:
        rows = tokens[(tokens["sample_index"] == index) & (tokens["layer"] == 1) & (tokens["module"] == "layer")]
        if "checkpoint" in rows:
            rows = rows[rows["checkpoint"] == steps[-1][1]]
        rows = rows.sort_values("position")
        sample = by_index.get(int(index))
        prompt = "" if sample is None else (sample.prompt if isinstance(sample.prompt, str) else
                                            "\n".join(f"[{m['role']}] {m['content']}" for m in sample.prompt))
        sample_rows.append({"index": int(index), "id": str(rows["sample"].iloc[0]), "prompt": prompt,
                            "tokens": rows["token_id"].astype(int).tolist(), "positions": rows["position"].astype(int).tolist()})
    boundary = result.boundary
    shown = f"showing {len(chosen)} of {len(available)} samples"
    across = len(steps) > 1
    model = (f"{len(steps)} checkpoints ({steps[0][1]} … {steps[-1][1]})" if across else meta["model"])
    return {
        "title": f"{model}: what each internal policy predicts",
        "meta": (f"norm mode {result.norm_mode} · {n_layers} layers · boundary layer "
                 f"{boundary if boundary is not None else 'none'} · {shown}"
                 + (f" · {len(steps)} checkpoints" if len(steps) > 1 else "")),
        "note": (("Hover a cell: the policy's top tokens with their probabilities, and the probability and rank of "
                  "the token the response continues with (bold when it is among them). " if top_k else
                  "Hover a cell: its entropies (this result was analysed with --top-k 0, so no predictions). ")
                 + f"Entropies in nats; definitions: {DEFINITIONS_URL} "
                 + (f"ipolicy view --samples {len(available)} holds every sample." if len(chosen) < len(available) else "")),
        "n_layers": n_layers, "top_k": top_k, "boundary": boundary,
        "steps": [{"step": None if s is None else int(s), "label": "result" if s is None else f"step {int(s)}: {c}"}
                  for s, c in steps],
        "samples": sample_rows, "vocab": vocab, "arrays": arrays,
    }


def _vocabulary_from(tokens: pd.DataFrame) -> pd.DataFrame:
    return tokens[["token_id", "text"]].drop_duplicates("token_id")


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _sample_arrays(tokens: pd.DataFrame, predictions, index: int, checkpoint: str | None, n_layers: int, top_k: int):
    """One sample (at one checkpoint, by its label) as the page's arrays: entropies [T, L, 3 modules, in/out] float32, and for the
    three output policies the top ids [T, L, 3, K] int32, top probs [T, L, 3, K] float32, the sampled token's
    probability [T, L, 3] float32 and rank [T, L, 3] int32."""
    import pyarrow.compute as pc

    rows = tokens[tokens["sample_index"] == index]
    if checkpoint is not None:
        rows = rows[rows["checkpoint"] == checkpoint]
    positions = np.sort(rows["position"].unique())
    t = np.searchsorted(positions, rows["position"].to_numpy())
    layer = rows["layer"].to_numpy() - 1
    module = rows["module"].map({m: i for i, m in enumerate(MODULES)}).to_numpy()
    entropy = np.zeros((len(positions), n_layers, 3, 2), dtype=np.float32)
    entropy[t, layer, module, 0] = rows["entropy_in"].to_numpy()
    entropy[t, layer, module, 1] = rows["entropy_out"].to_numpy()
    token_ids = rows["token_id"].to_numpy()
    shape = (len(positions), n_layers, 3)
    ids = np.zeros((*shape, top_k), dtype=np.int32)
    probs = np.zeros((*shape, top_k), dtype=np.float32)
    token_prob = np.zeros(shape, dtype=np.float32)
    rank = np.zeros(shape, dtype=np.int32)
    if top_k:
        mask = pc.equal(predictions["sample_index"], index)
        if checkpoint is not None:
            mask = pc.and_(mask, pc.equal(predictions["checkpoint"], checkpoint))
        part = predictions.filter(mask)
        state = np.asarray(part["state"].to_pylist(), dtype=object)
        layers = part["layer"].to_numpy()
        slot = np.full(len(part), -1)
        slot[(state == "resid") & (layers >= 1)] = 0  # the layer output h_l (layer L: the real policy)
        slot[state == "attn_out"] = 1
        slot[state == "ffn_out"] = 2
        keep = slot >= 0
        t_p = np.searchsorted(positions, part["position"].to_numpy()[keep])
        l_p, s_p = layers[keep] - 1, slot[keep]
        ids[t_p, l_p, s_p] = pc.list_flatten(part["top_ids"]).to_numpy().reshape(-1, top_k)[keep]
        probs[t_p, l_p, s_p] = pc.list_flatten(part["top_probs"]).to_numpy().reshape(-1, top_k)[keep]
        token_prob[t_p, l_p, s_p] = part["token_prob"].to_numpy()[keep]
        rank[t_p, l_p, s_p] = part["token_rank"].to_numpy()[keep]
    encoded = {"entropy": _b64(entropy), "ids": _b64(ids), "probs": _b64(probs), "token_prob": _b64(token_prob),
               "token_rank": _b64(rank)}
    return encoded, ids.reshape(-1), token_ids


def render(data: dict) -> str:
    """The page: the template with the data embedded as JSON that no text can break out of."""
    template = files("internal_policy").joinpath("templates/view.html").read_text(encoding="utf-8")
    payload = (json.dumps(data, ensure_ascii=False, separators=(",", ":"))
               .replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e"))
    return template.replace("__TITLE__", html.escape(data["title"])).replace("__DATA__", payload)
