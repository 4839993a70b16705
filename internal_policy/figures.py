"""The paper's figures from stored results (seaborn, one style): entropy flow (Fig. 2), entropy change (Fig. 3),
entropy dynamics across checkpoints, feature refinement (Fig. 5), training curves and pass@k.

Each function returns a matplotlib figure drawn inside a style context, so the caller's own matplotlib and
seaborn settings (a notebook's theme) are left as they were.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from matplotlib.ticker import MaxNLocator
import matplotlib.pyplot as plt  # headless, matplotlib picks Agg by itself; in a notebook, the inline backend
import pandas as pd
import seaborn as sns

from .errors import IPolicyError
from .io import atomic_path
from .runs import RunFolder, check_output_folder, folder_lock, trainer_metrics
from .stats import boundary_layer

PALETTE = {"layer input": "#4C72B0", "attention output": "#DD8452", "FFN output": "#55A868", "layer output": "#C44E52"}


def _styled(draw):
    """Draw under the project's seaborn style without changing the caller's global settings."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        style = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper", font_scale=1.15)}
        with plt.rc_context(style):
            return draw(*args, **kwargs)

    return wrapper


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


@_styled
def entropy_flow(summary: pd.DataFrame, title: str = "", norm_mode: str = "none"):
    """Fig. 2: per layer, the entropy of the layer input h_{l-1}, the attention output a_l, the FFN output f_l and the
    layer output h_l (nats)."""
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


@_styled
def entropy_change(summary: pd.DataFrame, boundary: int | None = None, title: str = "", norm_mode: str = "none"):
    """Fig. 3: mean entropy change dH of attention and FFN per layer, with the interquartile range of the per-token
    changes as a band; the boundary layer, if any, is marked."""
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


def _tick_step(n: int, most: int = 12) -> int:
    """Label every k-th row of a heatmap so that at most ``most`` labels share an axis (30 layers: every 3rd)."""
    return max(1, -(-n // most))


def _layer_grid(summary: pd.DataFrame, module: str) -> tuple[pd.DataFrame, str]:
    """[layer x checkpoint] mean output entropy of ``module``, and the x axis' name: columns are training steps, or,
    where models share a step (different models compared, each at step 0), the models' labels in their order, so
    that no two models are ever averaged into one column."""
    part = summary[summary["module"] == module]
    if "checkpoint" in part and part.groupby("step")["checkpoint"].nunique().max() > 1:
        order = list(dict.fromkeys(part["checkpoint"]))
        grid = part.pivot_table(index="layer", columns="checkpoint", values="entropy_out_mean")[order]
        return grid, "model"
    return part.pivot_table(index="layer", columns="step", values="entropy_out_mean"), "training step"


def last_model(summary: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The rows of the last model of an across-checkpoint summary (the last label, in the order analysed) and that
    label; a single model's summary as it is, and None."""
    if "checkpoint" not in summary:
        return summary, None
    label = summary["checkpoint"].iloc[-1]
    return summary[summary["checkpoint"] == label], label


@_styled
def entropy_dynamics(summary: pd.DataFrame, module: str = "layer"):
    """Entropy of each layer's output policy across checkpoints: a layer x step heatmap and one line per layer."""
    grid, axis = _layer_grid(summary, module)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.1, 1]})
    sns.heatmap(grid, ax=left, cmap="viridis", cbar_kws={"label": "mean entropy H(h_l) (nats)"},
                yticklabels=_tick_step(len(grid.index)), xticklabels=_tick_step(len(grid.columns)))
    left.invert_yaxis()
    left.set_xlabel(axis)
    left.set_ylabel("layer l")
    left.set_title("Layer policy entropy across checkpoints" if axis == "training step" else "Layer policy entropy per model")
    palette = sns.color_palette("viridis", n_colors=len(grid.index))
    x = list(grid.columns) if axis == "training step" else list(range(len(grid.columns)))
    for color, (layer, values) in zip(palette, grid.iterrows()):
        right.plot(x, values.values, marker="o", markersize=3, color=color, linewidth=1.2, label=f"layer {layer}")
    right.set_xlabel(axis)
    right.set_ylabel("mean entropy (nats)")
    right.set_title("One line per layer")
    if axis == "training step":
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        right.set_xticks(x, list(grid.columns), rotation=30, ha="right", fontsize=8)
    if len(grid.index) <= 12:
        right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


@_styled
def entropy_dynamics_side_by_side(summaries: dict[str, pd.DataFrame], module: str = "layer"):
    """Fig. 7's comparison: one layer x step heatmap of the layer policies' mean entropy per result (e.g. GRPO and
    BuPO), on one colour scale, so that equal colours are equal entropies."""
    grids, axes_names = {}, {}
    for label, summary in summaries.items():
        grids[label], axes_names[label] = _layer_grid(summary, module)
    low = min(float(g.min().min()) for g in grids.values())
    high = max(float(g.max().max()) for g in grids.values())
    fig, axes = plt.subplots(1, len(grids), figsize=(5.2 * len(grids), 4.2), squeeze=False)
    for i, (ax, (label, grid)) in enumerate(zip(axes[0], grids.items())):
        sns.heatmap(grid, ax=ax, cmap="viridis", vmin=low, vmax=high, cbar=i == len(grids) - 1,
                    cbar_kws={"label": "mean entropy H(h_l) (nats)"}, yticklabels=_tick_step(len(grid.index)),
                    xticklabels=_tick_step(len(grid.columns)))
        ax.invert_yaxis()
        ax.set(xlabel=axes_names[label], ylabel="layer l" if i == 0 else "", title=label)
    fig.suptitle("Layer policy entropy across checkpoints (one colour scale)", y=1.02)
    fig.tight_layout()
    return fig


@_styled
def internal_layer_dynamics(summaries: dict[str, pd.DataFrame], layer: int):
    """Fig. 4's view of one layer across checkpoints: the entropy of its layer policy H(h_k) and the entropy change
    of its attention and FFN (ΔH = H(out) - H(in)), one line per result."""
    panels = (("layer", "entropy_out_mean", f"H(h_{layer}) (nats)"), ("attn", "delta_mean", f"attention ΔH, layer {layer}"),
              ("ffn", "delta_mean", f"FFN ΔH, layer {layer}"))
    steps = sorted({int(s) for summary in summaries.values() for s in summary["step"].unique()})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (module, column, label) in zip(axes, panels):
        for name, summary in summaries.items():
            rows = summary[(summary["module"] == module) & (summary["layer"] == layer)].sort_values("step")
            ax.plot(rows["step"], rows[column], marker="o", markersize=3, label=name)
        ax.set(xlabel="training step", ylabel=label)
        if len(steps) <= 12:  # the checkpoints themselves (e.g. every 3 steps), not a locator's round numbers
            ax.set_xticks(steps)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Internal layer {layer} across checkpoints", y=1.02)
    fig.tight_layout()
    return fig


TRAINING_PANELS = (
    ("reward_mean", "mean reward"),
    ("accuracy", "accuracy"),
    ("response_len_mean", "response length (tokens)"),
    ("entropy", "final policy entropy (nats)"),
    ("internal_entropy", "H(π(h_k)) (nats),\nk: each run's monitor_layer"),
)


@_styled
def training_curves(runs: dict[str, pd.DataFrame]):
    """GRPO vs BuPO training curves. ``runs`` maps a label (e.g. 'BuPO seed 1') to its metrics.jsonl table; runs whose
    labels share the part before ' seed' are drawn in one colour with the spread across seeds as a band."""
    frames = []
    for label, metrics in runs.items():
        frame = metrics.copy()
        frame["run"] = label
        frame["method"] = label.split(" seed")[0]
        frames.append(frame)
    data = pd.concat(frames, ignore_index=True)
    panels = [(column, label) for column, label in TRAINING_PANELS if column in data and data[column].notna().any()]
    layers = data.groupby("method", sort=False)["monitor_layer"].unique() if "monitor_layer" in data else None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.6), squeeze=False)
    axes = axes[0]
    for ax, (column, label) in zip(axes, panels):
        sns.lineplot(data=data, x="step", y=column, hue="method", errorbar=("pi", 100), ax=ax, marker="o", markersize=3)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        if ax is not axes[0] and ax.get_legend():
            ax.get_legend().remove()
        if column == "internal_entropy" and layers is not None and data["monitor_layer"].nunique() > 1:
            # runs monitor different layers: each line says which, rather than one axis implying one layer
            handles, names = ax.get_legend_handles_labels()
            ax.legend(handles, [f"{n}: k = {', '.join(str(int(k)) for k in layers[n])}" for n in names], fontsize=7)
    internal = data[data["phase"] == "internal"]["step"] if "phase" in data else []
    if len(internal):
        for ax in axes:
            ax.axvspan(0.5, internal.max() + 0.5, color="gray", alpha=0.08, linewidth=0)
    seeds = data.groupby("method")["run"].nunique()  # a band only where a method has several runs
    counts = str(seeds.max()) if seeds.min() == seeds.max() else f"{seeds.min()}–{seeds.max()}"
    notes = ["shaded: steps 1..S of the BuPO runs"] * bool(len(internal))
    notes += [f"bands: min–max over {counts} seeds"] * bool(seeds.max() > 1)
    fig.suptitle("Training curves" + (f" ({'; '.join(notes)})" if notes else ""), y=1.02)
    fig.tight_layout()
    return fig


@_styled
def feature_refinement(refinement: pd.DataFrame):
    """Fig. 5: cos(h_k, h_j) and KL(pi(h_k) || pi(h_j)) against the higher layer j, one line per checkpoint."""
    data = refinement.copy()
    if "step" not in data:
        data["step"] = 0
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    sns.lineplot(data=data, x="layer_j", y="cos_mean", hue="step", palette="viridis", marker="o", markersize=3, ax=left)
    sns.lineplot(data=data, x="layer_j", y="kl_mean", hue="step", palette="viridis", marker="o", markersize=3, ax=right)
    k = int(data["layer_k"].iloc[0])
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set(xlabel="higher layer j", ylabel=f"cos(h_{k}, h_j)", title=f"Feature refinement of layer {k}: similarity")
    right.set(xlabel="higher layer j", ylabel=f"KL(π(h_{k}) ‖ π(h_j)) (nats)", title="Policy divergence")
    for ax in (left, right):
        ax.legend(title="step", fontsize=8)
    fig.tight_layout()
    return fig


@_styled
def pass_at_k_curves(problems: pd.DataFrame):
    """Mean pass@k against k (log scale) per model, one panel per dataset, from an eval's problems.csv."""
    columns = sorted((c for c in problems.columns if c.startswith("pass@")), key=lambda c: int(c[5:]))
    long = problems.melt(id_vars=["model", "dataset"], value_vars=columns, var_name="k", value_name="pass")
    long["k"] = long["k"].str[5:].astype(int)
    datasets = list(dict.fromkeys(long["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        part = long[long["dataset"] == dataset].groupby(["model", "k"], sort=False)["pass"].mean().reset_index()
        sns.lineplot(data=part, x="k", y="pass", hue="model", marker="o", ax=ax)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="k", ylabel="pass@k", title=str(dataset), ylim=(0, 1))
    fig.tight_layout()
    return fig


@_styled
def pass_at_k_bands(table: pd.DataFrame, title: str = "", ax=None, ylabel: str = "pass@k",
                    styles: dict[str, dict] | None = None):
    """The paper's Fig. 6 view with intervals: mean pass@k against k (log scale) per method, each with its band.
    ``table``: one row per (method, k) with ``mean``, ``low`` and ``high`` (e.g. a bootstrap interval over seeds and
    problems); differences work too (``ylabel``; a line at zero when a band crosses it). ``ax``: draw there instead of
    a new figure. ``styles``: per method, keyword arguments of its line (``color``, ``linestyle``, ``marker``); by
    default the colorblind palette in table order, with dots."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.0, 4.0))
    palette = sns.color_palette("colorblind", n_colors=table["method"].nunique())
    for color, (method, rows) in zip(palette, table.groupby("method", sort=False)):
        rows = rows.sort_values("k")
        style = {"color": color, "marker": "o", **(styles or {}).get(method, {})}
        ax.plot(rows["k"], rows["mean"], label=method, **style)
        ax.fill_between(rows["k"], rows["low"], rows["high"], color=style["color"], alpha=0.15, linewidth=0)
    if table["low"].min() < 0 < table["high"].max():
        ax.axhline(0, color="0.5", linewidth=0.8, zorder=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(table["k"].unique()), [str(k) for k in sorted(table["k"].unique())])
    ax.set(xlabel="k", ylabel=ylabel, title=title or f"{ylabel} (bands: 95 % intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figures_from_results(results: list[Path], out: Path, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """The paper's figure set from stored results. Each folder is recognised by its files: an entropy result
    (summary.csv; with a step column, across checkpoints; refinement.csv), a training run (metrics.jsonl), or an
    evaluation (problems.csv). Training runs are drawn together, labelled GRPO/BuPO and seed; several
    across-checkpoint results also side by side; the layer of a refinement, across checkpoints, per result."""
    check_output_folder(out)
    kinds = {folder: _kind(folder) for folder in map(Path, results)}  # before anything is written
    with folder_lock(out):
        return _figures_from_results(kinds, Path(out), formats)


def _kind(folder: Path) -> str:
    """What ``folder`` holds, by its files: "entropy" (summary.csv of layers), "run" (an ipolicy run's metrics.jsonl),
    "trainer" (a TRL / HF Trainer output folder) or "evaluation" (problems.csv); anything else is refused, a verl run
    with where its metrics are."""
    if not folder.is_dir():
        raise IPolicyError(f"'{folder}' does not exist or is not a folder. Fix: check the path.")
    if (folder / "summary.csv").is_file() and "layer" in pd.read_csv(folder / "summary.csv", nrows=1).columns:
        return "entropy"
    if RunFolder(folder).metrics_path.is_file():
        return "run"
    if trainer_metrics(folder) is not None:
        return "trainer"
    if (folder / "problems.csv").is_file():
        return "evaluation"
    if any(folder.glob("global_step_*/actor")):
        raise IPolicyError(f"'{folder}' is a verl run, whose training metrics live in its logger (console, wandb), "
                           "not in its checkpoints. Fix: analyse its checkpoints with `ipolicy entropy --run "
                           f"{folder}` and pass that result to `ipolicy figures`.")
    raise IPolicyError(f"'{folder}' holds no results ipolicy knows (summary.csv, metrics.jsonl or problems.csv). "
                       "Fix: pass result folders.")


def _figure_names(results: list[Path]) -> dict[Path, str]:
    """A distinct file-name prefix per result folder: its name, or, where two folders share one, the name with its
    parent's (and, where that too is shared, a number), so that no result's figures overwrite another's."""
    names = {}
    for folder in results:
        name = folder.name
        if sum(f.name == folder.name for f in results) > 1:
            name = f"{folder.parent.name}-{folder.name}"
        while name in names.values():
            name = f"{name}-{len(names)}"
        names[folder] = name
    return names


# options that differ between runs of one method without making it another (how long, how often it saves, where it
# logs), and the seed, which is what repeats
_NOT_A_METHOD = ("seed", "steps", "save_every", "tensorboard", "wandb", "vllm_gpu_memory", "device")


def _label_runs(runs: list[tuple[Path, str]]) -> dict[str, pd.DataFrame]:
    """Training curves' labels 'METHOD seed S': runs of one method (GRPO, BuPO K, S) that differ in any other option
    (a learning rate, the data) get those options in their method, so that only seeds are drawn as one band; two runs
    of one method and seed keep apart by their folder's name."""
    folders = {folder: RunFolder(folder) for folder, _ in runs}
    configs = {folder: run.info().get("config", {}) for folder, run in folders.items()}
    labels: dict[str, pd.DataFrame] = {}
    for folder, name in runs:
        run, config = folders[folder], configs[folder]
        peers = [configs[f] for f in folders if folders[f].method() == run.method()]
        differ = sorted(k for k in config if k not in _NOT_A_METHOD and len({json.dumps(p.get(k)) for p in peers}) > 1)
        method = run.method() + "".join(f", {k}={config[k]}" for k in differ)
        label = f"{method} seed {config.get('seed', name)}"
        labels[label if label not in labels else f"{label} ({name})"] = run.metrics()
    return labels


def _boundary_tolerance(folder: Path) -> float:
    """The tolerance the run found its boundary layer with (manifest.json), else the default."""
    from .config import BOUNDARY_TOLERANCE

    manifest = folder / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        for entry in [data, *data.get("checkpoints", [])[-1:]]:
            if "boundary_tolerance_nats" in entry:
                return float(entry["boundary_tolerance_nats"])
    return BOUNDARY_TOLERANCE


def _figures_from_results(kinds: dict[Path, str], out: Path, formats: tuple[str, ...]) -> list[Path]:
    written: list[Path] = []
    runs: dict[str, pd.DataFrame] = {}
    training: list[tuple[Path, str]] = []  # ipolicy runs, labelled together once all are known
    dynamics: dict[str, pd.DataFrame] = {}  # across-checkpoint summaries, drawn together at the end
    refined: set[int] = set()  # the layers whose refinement was measured
    names = _figure_names(list(kinds))
    for folder, kind in kinds.items():
        name = names[folder]
        if kind == "entropy":
            summary = pd.read_csv(folder / "summary.csv")
            norm = str(summary["norm_mode"].iloc[0]) if "norm_mode" in summary else "none"
            if "step" in summary:
                dynamics[name] = summary
                written += save_figure(entropy_dynamics(summary), out / f"{name}_entropy_dynamics", formats)
            summary, label = last_model(summary)
            which = f" (the last model: {label})" if label else ""
            boundary = boundary_layer(summary, _boundary_tolerance(folder))
            written += save_figure(entropy_flow(summary, f"{name}: internal policy entropy{which}", norm),
                                   out / f"{name}_entropy_flow", formats)
            written += save_figure(entropy_change(summary, boundary, f"{name}: module entropy change{which}", norm),
                                   out / f"{name}_entropy_change", formats)
            if (folder / "refinement.csv").is_file():
                refinement = pd.read_csv(folder / "refinement.csv")
                refined.add(int(refinement["layer_k"].iloc[0]))
                written += save_figure(feature_refinement(refinement), out / f"{name}_refinement", formats)
        elif kind == "run":
            training.append((folder, name))
        elif kind == "trainer":
            runs[f"{name} (TRL)"] = trainer_metrics(folder)
        else:  # an evaluation
            written += save_figure(pass_at_k_curves(pd.read_csv(folder / "problems.csv")), out / f"{name}_pass_at_k", formats)
    runs.update(_label_runs(training))
    if runs:
        written += save_figure(training_curves(runs), out / "training_curves", formats)
    if len(dynamics) > 1:
        written += save_figure(entropy_dynamics_side_by_side(dynamics), out / "entropy_dynamics_side_by_side", formats)
    for layer in sorted(refined) if dynamics else ():
        written += save_figure(internal_layer_dynamics(dynamics, layer), out / f"internal_layer_{layer}", formats)
    return written
