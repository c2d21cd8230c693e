"""The papers' figures from the tidy tables (seaborn): metric vs layer, vs batch size, vs number
of sequential edits, and downstream score vs number of edits."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .experiments import read_results  # noqa: E402
from .io import atomic_path  # noqa: E402

EDIT_METRICS = ["ES", "PS", "NS", "S"]
LABELS = {"ES": "efficacy score (%)", "PS": "paraphrase score (%)", "NS": "neighbourhood score (%)",
          "S": "overall score S (%)", "n_edits": "number of edits", "batch_size": "batch size", "layer": "edited layer"}


def _long(frame: pd.DataFrame, metrics=EDIT_METRICS) -> pd.DataFrame:
    return frame.melt(id_vars=[c for c in frame.columns if c not in metrics], value_vars=metrics,
                      var_name="metric", value_name="score")


def _save(figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def _empty(path: str | Path, message: str) -> None:
    figure, axis = plt.subplots(figsize=(5, 2))
    axis.axis("off")
    axis.text(0.5, 0.5, message, ha="center", va="center")
    _save(figure, path)


def layer_sweep_figure(sweep: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """ES/PS/NS/S against the edited layer, one line per method."""
    if sweep.empty:
        return _empty(path, "no layer sweep configured")
    data = _long(sweep.assign(layer=sweep["layers"].astype(int)))
    grid = sns.relplot(data=data, x="layer", y="score", hue="method", col="metric", kind="line", marker="o",
                       col_wrap=4, height=2.8, facet_kws={"sharey": False})
    grid.set_axis_labels(LABELS["layer"], "score (%)").set_titles("{col_name}")
    grid.figure.suptitle(f"Layer sweep: single edits per layer ({title})", y=1.04)
    _save(grid.figure, path)


def batch_size_figure(edits: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Metrics against batch size (log scale) for the batched experiment (MEMIT vs EMMET ...)."""
    data = edits[edits["experiment"] == "batched"] if not edits.empty else edits
    if data.empty:
        return _empty(path, "no batched experiment configured")
    grid = sns.relplot(data=_long(data), x="batch_size", y="score", hue="method", col="metric", kind="line",
                       marker="o", col_wrap=4, height=2.8, facet_kws={"sharey": False})
    for axis in grid.axes.flat:
        axis.set_xscale("log", base=2)
    grid.set_axis_labels(LABELS["batch_size"], "score (%)").set_titles("{col_name}")
    grid.figure.suptitle(f"Batched editing: metrics vs batch size ({title})", y=1.04)
    _save(grid.figure, path)


def sequential_figure(edits: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Metrics on all facts edited so far against the number of edits, per method and batch size."""
    data = edits[(edits["experiment"] == "sequential") & (edits["scope"] == "edited_so_far")] if not edits.empty else edits
    if data.empty:
        return _empty(path, "no sequential experiment configured")
    data = _long(data).assign(batch=lambda f: "b=" + f["batch_size"].astype(int).astype(str))
    grid = sns.relplot(data=data, x="n_edits", y="score", hue="batch", row="method", col="metric", kind="line",
                       marker="o", height=2.3, aspect=1.2, facet_kws={"sharey": False})
    grid.set_axis_labels(LABELS["n_edits"], "score (%)").set_titles("{row_name} | {col_name}")
    grid.figure.suptitle(f"Sequential-batched editing: metrics on all facts edited so far ({title})", y=1.02)
    _save(grid.figure, path)


def _primary_metric(downstream: pd.DataFrame) -> pd.DataFrame:
    """One metric per task: acc_norm is skipped when acc exists."""
    keep = []
    for _, group in downstream.groupby("task"):
        metrics = list(dict.fromkeys(group["metric"]))
        metric = "acc" if "acc" in metrics else metrics[0]
        keep.append(group[group["metric"] == metric])
    return pd.concat(keep, ignore_index=True)


def downstream_figure(downstream: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Downstream score against the number of sequential edits, one line per method, per task."""
    data = downstream[downstream["experiment"] == "sequential"] if not downstream.empty else downstream
    if data.empty:
        return _empty(path, "no downstream evaluation configured")
    data = _primary_metric(data).assign(batch=lambda f: "b=" + f["batch_size"].astype(int).astype(str))
    grid = sns.relplot(data=data, x="n_edits", y="value", hue="method", style="batch", col="task", kind="line",
                       marker="o", height=3, facet_kws={"sharey": False})
    grid.set_axis_labels(LABELS["n_edits"], "downstream score").set_titles("{col_name}")
    grid.figure.suptitle(f"General abilities under sequential editing ({title})", y=1.04)
    _save(grid.figure, path)


def batch_vs_sequential_figure(downstream: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Downstream score after N edits: one batch of N (batched) vs sequential batches."""
    if downstream.empty or "batched" not in set(downstream["experiment"]):
        return _empty(path, "needs downstream evaluation in the batched experiment")
    data = _primary_metric(downstream)
    label = data["experiment"] + data["batch_size"].map(lambda b: "" if b == 0 else f" b={int(b)}")
    data = data.assign(run=label.where(data["experiment"] == "sequential", "one batch of N"))
    data = data[data["method"].isin(set(downstream.loc[downstream["experiment"] == "batched", "method"]))]
    grid = sns.relplot(data=data, x="n_edits", y="value", hue="run", row="method", col="task", kind="line",
                       marker="o", height=2.6, facet_kws={"sharey": False})
    grid.set_axis_labels(LABELS["n_edits"], "downstream score").set_titles("{row_name} | {col_name}")
    grid.figure.suptitle(f"Bigger batch vs sequential batches: downstream score ({title})", y=1.02)
    _save(grid.figure, path)


def write_figures(edits_csv, sweep_csv, downstream_csv, outputs: dict[str, str | Path], title: str = "") -> None:
    """Write every figure named in `outputs` (name -> png path)."""
    sns.set_theme(style="whitegrid", context="paper")
    edits, sweep, downstream = read_results(edits_csv), read_results(sweep_csv), read_results(downstream_csv)
    makers = {
        "layer_sweep": lambda p: layer_sweep_figure(sweep, p, title),
        "batch_size": lambda p: batch_size_figure(edits, p, title),
        "sequential": lambda p: sequential_figure(edits, p, title),
        "downstream": lambda p: downstream_figure(downstream, p, title),
        "batch_vs_sequential": lambda p: batch_vs_sequential_figure(downstream, p, title),
    }
    for name, path in outputs.items():
        makers[name](path)
