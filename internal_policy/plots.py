"""The paper's figures from stored results (seaborn, one style): entropy flow (Fig. 2) and entropy change (Fig. 3)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .io import atomic_path  # noqa: E402

PALETTE = {"layer input": "#4C72B0", "attention output": "#DD8452", "FFN output": "#55A868", "layer output": "#C44E52"}


def _style() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.15)


def save_figure(fig, path: Path, formats: tuple[str, ...] = ("png",)) -> list[Path]:
    """Save ``fig`` atomically as ``path`` with each suffix in ``formats``; closes the figure."""
    written = []
    for fmt in formats:
        target = Path(path).with_suffix(f".{fmt}")
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=fmt, dpi=160, bbox_inches="tight")
        written.append(target)
    plt.close(fig)
    return written


def entropy_flow(summary: pd.DataFrame, title: str = "", norm_mode: str = "none"):
    """Fig. 2: per layer, the entropy of the layer input h_{l-1}, the attention output a_l, the FFN output f_l and the
    layer output h_l (nats)."""
    _style()
    rows = summary.set_index(["layer", "module"])
    layers = sorted(summary["layer"].unique())
    series = {
        "layer input": [rows.loc[(l, "layer"), "entropy_in_mean"] for l in layers],
        "attention output": [rows.loc[(l, "attn"), "entropy_out_mean"] for l in layers],
        "FFN output": [rows.loc[(l, "ffn"), "entropy_out_mean"] for l in layers],
        "layer output": [rows.loc[(l, "layer"), "entropy_out_mean"] for l in layers],
    }
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(layers) + 3), 3.8))
    markers = {"layer input": "o", "attention output": "^", "FFN output": "s", "layer output": "D"}
    for name, values in series.items():
        ax.plot(layers, values, marker=markers[name], markersize=3.5, linewidth=1.4, label=name, color=PALETTE[name])
    ax.set_xlabel("layer l")
    ax.set_ylabel("mean entropy (nats)")
    ax.set_title(title or f"Internal policy entropy flow (norm mode: {norm_mode})")
    ax.legend(frameon=True, fontsize=9)
    ax.set_xlim(min(layers) - 0.5, max(layers) + 0.5)
    return fig


def entropy_change(summary: pd.DataFrame, boundary: int | None = None, title: str = "", norm_mode: str = "none"):
    """Fig. 3: mean entropy change dH of attention and FFN per layer, with the interquartile range of the per-token
    changes as a band; the boundary layer, if any, is marked."""
    _style()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * summary["layer"].nunique() + 3), 3.8))
    for module, label, color in (("attn", "attention", PALETTE["attention output"]), ("ffn", "FFN", PALETTE["FFN output"])):
        part = summary[summary["module"] == module].sort_values("layer")
        ax.plot(part["layer"], part["delta_mean"], marker="o", markersize=3.5, linewidth=1.4, color=color, label=f"{label} ΔH (mean)")
        ax.fill_between(part["layer"], part["delta_q25"], part["delta_q75"], color=color, alpha=0.18, linewidth=0, label=f"{label} ΔH (IQR)")
    ax.axhline(0.0, color="black", linewidth=0.8)
    if boundary is not None:
        ax.axvline(boundary, color="gray", linestyle="--", linewidth=1.0, label=f"boundary layer {boundary}")
    ax.set_xlabel("layer l")
    ax.set_ylabel("entropy change ΔH = H(out) − H(in) (nats)")
    ax.set_title(title or f"Module entropy change (norm mode: {norm_mode}); >0 explores, <0 converges")
    ax.legend(frameon=True, fontsize=8, ncol=2)
    return fig
