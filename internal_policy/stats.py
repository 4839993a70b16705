"""Statistics of stored results, with no model code: the per-(layer, module) summary of a token table, the boundary
layer, unbiased pass@k, and the intervals and tests that compare training runs. See docs/definitions.md."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .config import BOUNDARY_TOLERANCE

MODULES = ("layer", "attn", "ffn")  # the rows of every layer in the token table, in display order
SUMMARY_COLUMNS = ["layer", "module", "entropy_in_mean", "entropy_out_mean", "delta_mean", "n_tokens"]


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
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), as the stable product 1 - prod_{i=n-c+1}^{n} (1 - k/i)
    (docs/definitions.md §6): the chance that k of the n responses, drawn without replacement, hold a correct one.

    Examples:
        >>> pass_at_k(n=4, c=1, k=1), pass_at_k(n=4, c=1, k=2), pass_at_k(n=4, c=0, k=4)
        (0.25, 0.5, 0.0)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def bootstrap_mean(values, draws: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95 % percentile bootstrap interval of the mean of ``values``: [problems], or [seeds, problems] where
    both axes are resampled (a seed's runs and a problem's difficulty both vary). Returns (mean, low, high)."""
    rng = np.random.default_rng(seed)
    values = np.atleast_2d(np.asarray(values, dtype=float))
    means = np.empty(draws)
    for i in range(draws):
        rows = values[rng.integers(0, values.shape[0], values.shape[0])]
        means[i] = rows[:, rng.integers(0, values.shape[1], values.shape[1])].mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def seed_level_test(differences) -> dict:
    """Paired comparison of two methods where the training run is the unit that repeats: ``differences`` holds one
    number per seed (method B's mean minus method A's, each over the same problems). Returns the mean difference, the
    95 % paired t interval (``t_low``, ``t_high``) and the two-sided p-value of the exact sign-flip permutation test
    (all 2^n sign patterns; with 5 seeds the smallest possible p is 2/32 = 0.0625).

    Examples:
        >>> test = seed_level_test([-0.143, -0.223, -0.062, 0.009, -0.205])
        >>> round(test["mean"], 3), round(test["t_low"], 3), round(test["t_high"], 3), test["sign_flip_p"]
        (-0.125, -0.246, -0.003, 0.125)
    """
    from scipy import stats

    d = np.asarray(differences, dtype=float)
    if len(d) < 2:
        raise ValueError(f"a seed-level test needs at least 2 seeds, got {len(d)}")
    interval = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    flips = stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf,
                                   alternative="two-sided")
    return {"mean": float(d.mean()), "t_low": float(interval.low), "t_high": float(interval.high),
            "sign_flip_p": float(flips.pvalue), "seeds": len(d)}
