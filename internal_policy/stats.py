"""Statistics of stored results, with no model code (pandas only): the per-(layer, module) summary of a token table,
the boundary layer, and unbiased pass@k. See docs/definitions.md."""

from __future__ import annotations

import pandas as pd

MODULES = ("layer", "attn", "ffn")  # the rows of every layer in the token table, in display order
SUMMARY_COLUMNS = ["layer", "module", "entropy_in_mean", "entropy_out_mean", "delta_mean", "n_tokens"]
BOUNDARY_TOLERANCE = 0.05  # nats: |mean dH_ffn| below this counts as "about zero"


def summarize(tokens: pd.DataFrame, by: tuple[str, ...] = ()) -> pd.DataFrame:
    """Token-weighted statistics per (``by``..., layer, module). The first columns are SUMMARY_COLUMNS."""
    keys = [*by, "layer", "module"]
    grouped = tokens.groupby(keys, sort=False)
    summary = grouped.agg(
        entropy_in_mean=("entropy_in", "mean"),
        entropy_out_mean=("entropy_out", "mean"),
        delta_mean=("delta", "mean"),
        n_tokens=("delta", "size"),
        entropy_in_std=("entropy_in", "std"),
        entropy_out_std=("entropy_out", "std"),
        delta_std=("delta", "std"),
        delta_q05=("delta", lambda d: d.quantile(0.05)),
        delta_q25=("delta", lambda d: d.quantile(0.25)),
        delta_median=("delta", "median"),
        delta_q75=("delta", lambda d: d.quantile(0.75)),
        delta_q95=("delta", lambda d: d.quantile(0.95)),
        cos_resid_mean=("cos_resid", "mean"),
    ).reset_index()
    summary["module"] = pd.Categorical(summary["module"], categories=MODULES, ordered=True)
    summary = summary.sort_values(keys).reset_index(drop=True)
    summary["module"] = summary["module"].astype(str)
    front = [*SUMMARY_COLUMNS[:2], *by] if by else SUMMARY_COLUMNS[:2]
    rest = [c for c in summary.columns if c not in front]
    return summary[front + rest]


def boundary_layer(summary: pd.DataFrame, tolerance: float = BOUNDARY_TOLERANCE) -> int | None:
    """docs/definitions.md §1: the last layer l with mean dH_ffn(l) > 0 before the FFN entropy change turns to about 0 or negative.

    Walking up from layer 1, find the first layer whose mean FFN change exceeds ``tolerance`` (exploration), then
    return the last layer of that run of positive changes. None when no FFN layer explores.
    """
    ffn = summary[summary["module"] == "ffn"].sort_values("layer")
    boundary = None
    for layer, delta in zip(ffn["layer"], ffn["delta_mean"]):
        if delta > tolerance:
            boundary = int(layer)
        elif boundary is not None:
            break
    return boundary


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), as the stable product 1 - prod_{i=n-c+1}^{n} (1 - k/i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product
