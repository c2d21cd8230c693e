"""The papers' figures from the tidy tables (seaborn/matplotlib), every estimate with its interval.

Edit metrics are drawn with their 95% bootstrap intervals over facts (the `<metric>_lo/_hi`
columns of the tables) as bands or error bars; downstream accuracies with +-1.96 lm-eval standard
errors; causal-tracing effects with 95% bootstrap intervals over facts (seaborn, seeded).

So that no panel exaggerates, every panel of a metric in a figure has the same value range: the
metric's full range (`Y_LIMITS`, or the config's `figures.y_limits`), else the smallest range
that holds all of its panels; every panel has its own x tick labels; and where a table holds the
unedited model's value (the downstream tables' n_edits 0 rows), it is drawn as a dashed line
labelled "unedited".
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from editlib.io import atomic_path  # noqa: E402
from editlib.study.tables import (  # noqa: E402
    Z95,
    edits_over_samples,
    mean_accuracy_curve,
    model_labelled,
    over_samples,
    perplexity_metric,
    primary_metric,
    read_results,
)

EDIT_METRICS = ["ES", "PS", "NS", "S"]
# The full range of each metric as the tidy tables hold it, shared by all panels of the metric in
# a figure unless the config's figures.y_limits sets another (workflow/schemas/config.schema.yaml):
# edit scores in percent (editlib.eval.metrics scales ES/PS/NS/S by 100); lm-eval accuracies as
# proportions (downstream.csv `value`; a task scored by Matthews correlation, mcc, spans -1..1 and
# one whose values leave 0..1, e.g. a perplexity, gets the shared data range); causal tracing's
# indirect effect a difference of probabilities, None: the smallest range that holds every panel.
Y_LIMITS: dict[str, tuple[float, float] | None] = {
    **{metric: (0.0, 100.0) for metric in EDIT_METRICS}, "accuracy": (0.0, 1.0), "effect": None}
PAD = 0.02  # a fixed range is drawn with this fraction of it as margin, so that points at 0 or 100 stay whole
UNEDITED = "unedited"  # legend label of the unedited model's reference line
LABELS = {"ES": "efficacy ES (%)", "PS": "paraphrase PS (%)", "NS": "neighbourhood NS (%)",
          "S": "score S (%)", "n_edits": "number of edits", "batch_size": "batch size", "layer": "edited layer"}


def _save(figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def _empty(path: str | Path, message: str) -> None:
    figure, axis = plt.subplots(figsize=(5, 2))
    axis.axis("off")
    axis.text(0.5, 0.5, message, ha="center", va="center")
    _save(figure, path)


def _palette(levels: Sequence) -> dict:
    return dict(zip(levels, sns.color_palette(n_colors=max(1, len(levels)))))


def figure_limits(y_limits: Mapping[str, Sequence[float]] | None = None) -> dict[str, tuple[float, float] | None]:
    """`Y_LIMITS` with the config's figures.y_limits ({metric: [lo, hi]}) over it; ValueError naming
    the config field for an unknown metric or a range whose lo is not below its hi."""
    limits = dict(Y_LIMITS)
    for metric, span in (y_limits or {}).items():
        if metric not in Y_LIMITS:
            raise ValueError(f"figures.y_limits.{metric}: unknown metric; known: {sorted(Y_LIMITS)}")
        if len(span) != 2 or not float(span[0]) < float(span[1]):
            raise ValueError(f"figures.y_limits.{metric}: {list(span)} must be [lo, hi] with lo < hi")
        limits[metric] = (float(span[0]), float(span[1]))
    return limits


def _fixed_range(axis, span: tuple[float, float], which: str = "y") -> None:
    lo, hi = span
    margin = PAD * (hi - lo)
    (axis.set_ylim if which == "y" else axis.set_xlim)(lo - margin, hi + margin)


def _share_range(axes: Sequence, span: tuple[float, float] | None) -> None:
    """One y range on all `axes` (the panels of one metric): `span` with its margin, or None: the
    smallest range that holds every panel's own."""
    if not axes:
        return
    if span is None:
        lows, highs = zip(*(axis.get_ylim() for axis in axes))
        for axis in axes:
            axis.set_ylim(min(lows), max(highs))
    else:
        for axis in axes:
            _fixed_range(axis, span)


def _warn_outside(values, span: tuple[float, float] | None, metric: str, figure_name: str) -> None:
    """A configured range that cuts off drawn values is allowed (zooming in is a choice), but said."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if span is not None and len(values) and (values.min() < span[0] or values.max() > span[1]):
        warnings.warn(f"figures.y_limits.{metric} {list(span)}: {figure_name} has values from {values.min():.3g} "
                      f"to {values.max():.3g}; those outside are cut off", stacklevel=3)


def _reference_handles(labels: Sequence[str]) -> list[Line2D]:
    return [Line2D([], [], color="black", linewidth=1, linestyle=_dashes(i), label=label) for i, label in enumerate(labels)]


def _dashes(index: int) -> str:
    return ["--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))][index % 4]


def interval_lines(data: pd.DataFrame, x: str, metrics: Sequence[str], hue: str, row: str | None = None,
                   log_x: bool = False, title: str = "", band: bool = True, xlabel: str | None = None,
                   sharex: bool = True, limits: Mapping[str, tuple[float, float] | None] | None = None,
                   reference: Mapping[tuple, Sequence[tuple[str, float]]] | None = None):
    """A grid of panels (rows: `row` values, columns: metrics), one line per `hue` level with its
    interval from the `<metric>_lo` / `<metric>_hi` columns (band, or error bars).

    Every panel of a metric gets the same y range: `limits[metric]` (with a margin of PAD), or
    where that is None or missing the smallest range that holds all of them. `reference`: (row
    value, metric) -> [(label, value)], the unedited model's values drawn as dashed horizontal
    lines and named in the legend. Every panel has its x tick labels."""
    rows = list(dict.fromkeys(data[row])) if row else [None]
    levels = list(dict.fromkeys(data[hue]))
    colours = _palette(levels)
    reference = reference or {}
    reference_labels = list(dict.fromkeys(label for lines in reference.values() for label, _ in lines))
    figure, axes = plt.subplots(len(rows), len(metrics), figsize=(3.1 * len(metrics), 2.6 * len(rows)),
                                squeeze=False, sharex=sharex)
    for i, row_value in enumerate(rows):
        part = data if row is None else data[data[row] == row_value]
        for j, metric in enumerate(metrics):
            axis = axes[i][j]
            axis.tick_params(axis="x", which="both", labelbottom=True)  # sharex hides them above the last row
            for label, value in reference.get((row_value, metric), []):
                axis.axhline(value, color="black", linewidth=1, linestyle=_dashes(reference_labels.index(label)),
                             label=label, zorder=1.5)
            for level in levels:
                line = part[part[hue] == level].sort_values(x)
                if line.empty:
                    continue
                xs, ys = line[x].to_numpy(float), line[metric].to_numpy(float)
                lo, hi = line[f"{metric}_lo"].to_numpy(float), line[f"{metric}_hi"].to_numpy(float)
                axis.plot(xs, ys, marker="o", markersize=3, color=colours[level], label=str(level))
                if band and len(xs) > 1:
                    axis.fill_between(xs, lo, hi, color=colours[level], alpha=0.2, linewidth=0)
                else:
                    axis.errorbar(xs, ys, yerr=[ys - lo, hi - ys], fmt="none", color=colours[level], capsize=2)
            if log_x:
                axis.set_xscale("log", base=2)
            else:
                axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_title(metric if row is None else f"{row_value} | {metric}", fontsize=9)
            axis.set_xlabel(xlabel or LABELS.get(x, x))
            axis.set_ylabel(LABELS.get(metric, metric))
    for j, metric in enumerate(metrics):
        _share_range([axes[i][j] for i in range(len(rows))], (limits or {}).get(metric))
    handles = [Line2D([], [], color=colours[level], marker="o", markersize=3, label=str(level)) for level in levels]
    handles += _reference_handles(reference_labels)
    if handles:
        figure.legend(handles=handles, title=hue.replace("_", " "), loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.suptitle(title, y=1.02)
    figure.tight_layout()
    return figure


# The edit figures (layer sweep, sensitivity, single edits, batch size, sequential, batch vs
# sequential) draw no unedited line: edits.csv, layer_sweep.csv and sensitivity.csv hold no row of
# the unedited model (each row scores facts after at least one edit; the workflow does not score
# ES/PS/NS before editing), so there is no value to draw.


def _edit_lines(data: pd.DataFrame, name: str, y_limits: Mapping | None, **kwargs):
    """interval_lines of ES/PS/NS/S, each metric on its full range (or the configured one)."""
    limits = figure_limits(y_limits)
    for metric in EDIT_METRICS:
        if metric in (y_limits or {}):
            _warn_outside(data[metric], limits[metric], metric, name)
    return interval_lines(data, metrics=EDIT_METRICS, limits=limits, **kwargs)


def layer_sweep_figure(sweep: pd.DataFrame, path: str | Path, title: str = "", y_limits: Mapping | None = None) -> None:
    """ES/PS/NS/S against the edited layer, one line per method, 95% bands over facts."""
    if sweep.empty:
        return _empty(path, "no layer sweep configured")
    data = model_labelled(sweep.assign(layer=sweep["layers"].astype(int)), "method")
    _save(_edit_lines(data, "layer_sweep", y_limits, x="layer", hue="method",
                      title=f"Layer sweep: single edits at each layer, 95% intervals over facts ({title})"), path)


def sensitivity_figure(frame: pd.DataFrame, path: str | Path, title: str = "", y_limits: Mapping | None = None) -> None:
    """ES/PS/NS/S against the value of one swept hyperparameter (log scale), one row per method and
    hyperparameter, one line per batch size (1: single edits), 95% bands over facts."""
    if frame.empty:
        return _empty(path, "no sensitivity grid configured")
    data = frame.assign(edits=np.where(frame["batch_size"] == 1, "single edits",
                                       "batches of " + frame["batch_size"].astype(str)))
    data = model_labelled(data, "edits")
    data = data.assign(swept=data["method"] + ": " + data["parameter"])
    figure = _edit_lines(data, "sensitivity", y_limits, x="value", hue="edits", row="swept", log_x=True, sharex=False,
                         xlabel="hyperparameter value (log scale)",
                         title=f"Sensitivity: edits against one hyperparameter, 95% intervals over facts ({title})")
    for axis in figure.axes:
        axis.set_xscale("log", base=10)
    _save(figure, path)


def single_edits_figure(edits: pd.DataFrame, path: str | Path, title: str = "", y_limits: Mapping | None = None) -> None:
    """ES/PS/NS/S of single edits per method at its chosen layer, with 95% error bars; each
    metric's value axis (here x) on its full range."""
    data = edits[edits["experiment"] == "single"] if not edits.empty else edits
    if data.empty:
        return _empty(path, "no single-edit experiment configured")
    data = model_labelled(data.assign(label=data["method"] + " (layer " + data["layers"].astype(str) + ")"), "label")
    limits = figure_limits(y_limits)
    figure, axes = plt.subplots(1, len(EDIT_METRICS), figsize=(3.1 * len(EDIT_METRICS), 0.45 * len(data) + 1.2),
                                sharey=True, squeeze=False)
    positions = np.arange(len(data))
    for axis, metric in zip(axes[0], EDIT_METRICS):
        values = data[metric].to_numpy(float)
        err = [values - data[f"{metric}_lo"].to_numpy(float), data[f"{metric}_hi"].to_numpy(float) - values]
        axis.errorbar(values, positions, xerr=err, fmt="o", capsize=3)
        if metric in (y_limits or {}):
            _warn_outside(values, limits[metric], metric, "single_edits")
        _fixed_range(axis, limits[metric], which="x")
        axis.set_xlabel(LABELS[metric])
        axis.set_yticks(positions, data["label"])
    figure.suptitle(f"Single edits (model restored after each fact), 95% intervals over facts ({title})", y=1.02)
    figure.tight_layout()
    _save(figure, path)


def batch_size_figure(edits: pd.DataFrame, path: str | Path, title: str = "", y_limits: Mapping | None = None) -> None:
    """Metrics against batch size (log scale), each batch edited into the unedited model."""
    data = model_labelled(edits[edits["experiment"] == "batched"], "method") if not edits.empty else edits
    if data.empty:
        return _empty(path, "no batched experiment configured")
    _save(_edit_lines(data, "batch_size", y_limits, x="batch_size", hue="method", log_x=True,
                      title=f"Batched editing: metrics vs batch size, 95% intervals over facts ({title})"), path)


def _sequential_edits(edits: pd.DataFrame) -> pd.DataFrame:
    """Sequential runs' metrics on all facts edited so far, averaged over edit samples."""
    if edits.empty:
        return edits
    return edits_over_samples(edits[(edits["experiment"] == "sequential") & (edits["scope"] == "edited_so_far")])


def sequential_figure(edits: pd.DataFrame, path: str | Path, title: str = "", y_limits: Mapping | None = None) -> None:
    """Metrics on all facts edited so far against the number of edits, per method and batch size."""
    data = _sequential_edits(edits)
    if data.empty:
        return _empty(path, "no sequential experiment configured")
    data = model_labelled(data, "method").assign(batch=lambda f: "b=" + f["batch_size"].astype(int).astype(str))
    _save(_edit_lines(data, "sequential", y_limits, x="n_edits", hue="batch", row="method", log_x=True,
                      title=f"Sequential-batched editing: metrics on all facts edited so far ({title})"), path)


def batch_vs_sequential_figure(edits: pd.DataFrame, path: str | Path, title: str = "",
                               y_limits: Mapping | None = None) -> None:
    """After the same number N of edits: N/b sequential batches of b against batch size b
    (b = N is one batch of N), metrics on all N facts (Yoon et al.'s comparison)."""
    data = model_labelled(_sequential_edits(edits), "method")
    if data.empty:
        return _empty(path, "no sequential experiment configured")
    total = data["n_edits"].max()
    data = data[data["n_edits"] == total]
    compared = data.groupby("method")["batch_size"].nunique()
    data = data[data["method"].isin(compared[compared > 1].index)]
    if data.empty:
        return _empty(path, "needs a method run sequentially at several batch sizes")
    _save(_edit_lines(data, "batch_vs_sequential", y_limits, x="batch_size", hue="method", log_x=True, band=False,
                      xlabel=f"batch size b ({int(total)}/b batches)",
                      title=f"{int(total)} edits as {int(total)}/b sequential batches of b (b = {int(total)}: one batch); "
                            f"metrics on all {int(total)} facts, 95% intervals ({title})"), path)


def _task_columns(data: pd.DataFrame, index: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Downstream rows widened for interval_lines: per `index` row, each task's value and its
    +-1.96 SE bounds (<task>_lo, <task>_hi); and the tasks in order."""
    data = data.assign(lo=data["value"] - Z95 * data["stderr"].fillna(0), hi=data["value"] + Z95 * data["stderr"].fillna(0))
    wide = data.pivot_table(index=index, columns="task", values=["value", "lo", "hi"], sort=False)
    wide.columns = [task if kind == "value" else f"{task}_{kind}" for kind, task in wide.columns]
    return wide.reset_index(), list(dict.fromkeys(data["task"]))


def _task_limits(data: pd.DataFrame, tasks: list[str], y_limits: Mapping | None, name: str,
                 unbounded: set[str] = frozenset()) -> dict:
    """Each task's y range: the range its panels need for the `unbounded` tasks (perplexities); the
    configured figures.y_limits.accuracy for every other task; else by its metric (the tables'
    `metric`, where they keep it): mcc -1..1, a proportion (every value in 0..1: acc,
    exact_match, ...) 0..1, anything else the range its panels need."""
    limits = figure_limits(y_limits)
    spans = {}
    for task in tasks:
        part = data[data["task"] == task]
        metric = part["metric"].iloc[0] if "metric" in part.columns and len(part) else None
        if task in unbounded:
            spans[task] = None
        elif "accuracy" in (y_limits or {}):
            spans[task] = limits["accuracy"]
            _warn_outside(part["value"], limits["accuracy"], "accuracy", f"{name} ({task})")
        elif metric == "mcc":
            spans[task] = (-1.0, 1.0)
        elif part["value"].between(0, 1).all():
            spans[task] = limits["accuracy"]
        else:
            spans[task] = None
    return spans


def _unedited_lines(data: pd.DataFrame, rows: list, label_of=lambda model: UNEDITED) -> dict:
    """(row, task) -> [(label, value)]: the unedited model's accuracy, the n_edits 0 rows (every run
    of a model shares them: one downstream_base job), per model in the row; `rows` None: one row."""
    unedited = data[data["n_edits"] == 0]
    lines: dict = {}
    for (facet, task, model), part in unedited.groupby(["facet", "task", "model"], sort=False):
        key = (facet if rows != [None] else None, task)
        lines.setdefault(key, []).append((label_of(model), float(part["value"].mean())))
    return lines


def _task_lines(figure, tasks: list[str], rows: list[str], data: pd.DataFrame, x: str, x_values,
                y_labels: Mapping[str, str] | None = None) -> None:
    """Per-task panel titles, y labels ("accuracy", or the task's label in `y_labels`), checkpoint
    ticks and, where a line is the mean of several edit samples, the samples' range as a dashed band."""
    for index, axis in enumerate(figure.axes[: len(rows) * len(tasks)]):
        row, task = rows[index // len(tasks)], tasks[index % len(tasks)]
        axis.set_title(task if row is None else f"{row}\n{task}", fontsize=8)
        axis.set_ylabel((y_labels or {}).get(task, "accuracy"))
        positive = [c for c in x_values if c > 0]
        if positive and max(positive) > 20 * min(positive):  # e.g. 1, 10, 100, 1000 edits
            axis.set_xscale("symlog", linthresh=1)
        axis.set_xticks(x_values, [str(int(c)) for c in x_values])
        part = data[(data["task"] == task) & ((data["facet"] == row) if row is not None else True)]
        for _, line in part[part["n_samples"] > 1].groupby("run"):
            line = line.sort_values(x)
            axis.fill_between(line[x].to_numpy(float), line["spread_lo"].to_numpy(float),
                              line["spread_hi"].to_numpy(float), facecolor="none", edgecolor="grey",
                              linestyle="--", linewidth=0.6)


def downstream_figure(downstream: pd.DataFrame, path: str | Path, title: str = "", y_limits: Mapping | None = None) -> None:
    """Downstream accuracy against the number of sequential edits, +-1.96 standard errors, one panel
    per task (a perplexity task's panel shows its perplexity, lower is better); one row of panels
    per model; a run over several disjoint edit samples is drawn as their mean, the samples' range
    dashed; the unedited model's value (n_edits 0) as a dashed line."""
    data = downstream[downstream["experiment"] == "sequential"] if not downstream.empty else downstream
    if data.empty:
        return _empty(path, "no downstream evaluation configured")
    perplexity = perplexity_metric(data)  # held-out perplexity tasks: panels of their own, their own range
    data = over_samples(pd.concat([primary_metric(data), perplexity], ignore_index=True))
    smallest = data.groupby(["model", "method"])["batch_size"].transform("min")
    data = data[data["batch_size"] == smallest]  # one edit at a time where run so (Lin et al.)
    data = data.assign(run=data["method"] + " b=" + data["batch_size"].astype(int).astype(str), facet=data["model"])
    several = data["model"].nunique() > 1
    wide, tasks = _task_columns(data, ["facet", "run", "n_edits"])
    samples = int(data["n_samples"].max())
    rows = list(dict.fromkeys(data["facet"])) if several else [None]
    figure = interval_lines(wide, "n_edits", tasks, "run", row="facet" if several else None,
                            limits=_task_limits(data, tasks, y_limits, "downstream", unbounded=set(perplexity["task"])),
                            reference=_unedited_lines(data, rows),
                            title=f"General abilities under sequential editing, +-1.96 SE"
                                  f"{f', mean of {samples} edit samples (range dashed)' if samples > 1 else ''} ({title})")
    y_labels = {task: f"{metric.replace('_', ' ')} (lower is better)"
                for task, metric in perplexity.groupby("task", sort=False)["metric"].first().items()}
    _task_lines(figure, tasks, rows, data, "n_edits", sorted(data["n_edits"].unique()), y_labels)
    figure.tight_layout()
    _save(figure, path)


def ablations_figure(tables: dict[str, pd.DataFrame], path: str | Path, title: str = "",
                     y_limits: Mapping | None = None) -> None:
    """One row of panels per compared pair of every configured ablation (editlib.study.ablations):
    downstream accuracy per task against the number of sequential edits, one line per arm,
    +-1.96 SE (samples' range dashed where an arm is the mean of several); each model's unedited
    accuracy (n_edits 0) as a dashed line, one per model where the arms are two models."""
    frames = [table for table in tables.values() if not table.empty]
    if not frames:
        return _empty(path, "no ablation configured, or no downstream evaluation")
    data = over_samples(pd.concat(frames, ignore_index=True), keys=["ablation", "comparison", "role"])
    data = data.assign(facet=data["ablation"].str.replace("_", " ") + ": " + data["comparison"],
                       run=data["role"] + ": " + data["model"].where(data["ablation"].isin(["model_size", "instruction_tuning"]),
                                                                    data["method"]))
    wide, tasks = _task_columns(data, ["facet", "run", "n_edits"])
    kinds = ", ".join(dict.fromkeys(data["ablation"].str.replace("_", " ")))
    rows = list(dict.fromkeys(data["facet"]))
    one_model = data["model"].nunique() == 1
    figure = interval_lines(wide, "n_edits", tasks, "run", row="facet",
                            limits=_task_limits(data, tasks, y_limits, "ablations"),
                            reference=_unedited_lines(data, rows, lambda m: UNEDITED if one_model else f"{UNEDITED} {m}"),
                            title=f"Ablation ({kinds}): general abilities under sequential editing, +-1.96 SE ({title})")
    _task_lines(figure, tasks, rows, data, "n_edits", sorted(data["n_edits"].unique()))
    figure.tight_layout()
    _save(figure, path)


def causal_trace_figure(traces: pd.DataFrame, path: str | Path, title: str = "", y_limits: Mapping | None = None) -> None:
    """Average indirect effect per layer of restoring hidden / MLP / attention states at the
    subject's last token and at the last token, 95% bootstrap intervals over facts; one row of
    panels per model; all panels on one y range (figures.y_limits.effect, else the data's).

    No unedited line: tracing runs on the unedited model, and its effects are differences to the
    corrupted run, so the grey line at 0 (no effect) is the reference."""
    if traces.empty:
        return _empty(path, "no fact to trace: the model predicts none of the records' true objects")
    if "model" not in traces.columns:
        traces = traces.assign(model="")
    tokens, models = list(dict.fromkeys(traces["token"])), list(dict.fromkeys(traces["model"]))
    figure, axes = plt.subplots(len(models), len(tokens), figsize=(4.2 * len(tokens), 3 * len(models)), sharey=True,
                                squeeze=False)
    for row, model in enumerate(models):
        for axis, token in zip(axes[row], tokens):
            part = traces[(traces["token"] == token) & (traces["model"] == model)]
            sns.lineplot(data=part, x="layer", y="effect", hue="kind", marker="o", errorbar=("ci", 95), n_boot=1000,
                         seed=0, ax=axis)
            n_facts = part["case_id"].nunique()
            axis.set_title(f"{model + ': ' if len(models) > 1 else ''}restored at the {token.replace('_', ' ')} "
                           f"token ({n_facts} facts)", fontsize=9)
            axis.set_xlabel("layer")
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_ylabel("indirect effect on P(true object)")
            axis.axhline(0, color="grey", linewidth=0.5)
    span = figure_limits(y_limits)["effect"]
    if "effect" in (y_limits or {}):
        _warn_outside(traces["effect"], span, "effect", "causal_trace")
    _share_range(list(axes.flat), span)
    figure.suptitle(f"Causal tracing over the facts the model knows ({title})", y=1.02)
    figure.tight_layout()
    _save(figure, path)


def forgetting_figure(edits: pd.DataFrame, downstream: pd.DataFrame, steps: pd.DataFrame, path: str | Path,
                      title: str = "", y_limits: Mapping | None = None) -> None:
    """The long run: against the number of edits (log scale), one line per method, one row of panels
    per batch size: S on all facts edited so far (95% bootstrap band), mean downstream accuracy over
    tasks (+-1.96 SE band; the unedited model's dashed, half of it dotted: the collapse threshold of
    findings.COLLAPSED) and the probe's top-1 agreement with the unedited model after every batch (a
    count over fixed texts: no interval)."""
    from editlib.study.findings import COLLAPSED

    probed = steps[steps["agreement"].notna()] if not steps.empty and "agreement" in steps.columns else steps
    if probed.empty:
        return _empty(path, "no probed sequential run (experiments.sequential.probe)")
    so_far = _sequential_edits(edits)
    accuracy = mean_accuracy_curve(downstream)
    limits = figure_limits(y_limits)
    sizes = sorted(probed["batch_size"].unique())
    methods = list(dict.fromkeys(probed["method"]))
    colours = _palette(methods)
    panels = [("S", "score S on facts edited so far (%)"), ("accuracy", "mean downstream accuracy"),
              ("agreement", "probe agreement with unedited")]
    figure, axes = plt.subplots(len(sizes), len(panels), figsize=(3.6 * len(panels), 2.8 * len(sizes)), squeeze=False)
    for i, size in enumerate(sizes):
        for method in methods:
            colour = colours[method]
            line = so_far[(so_far["method"] == method) & (so_far["batch_size"] == size)].sort_values("n_edits") \
                if not so_far.empty else so_far
            if len(line):
                axes[i][0].plot(line["n_edits"], line["S"], color=colour, linewidth=1)
                axes[i][0].fill_between(line["n_edits"].to_numpy(float), line["S_lo"].to_numpy(float),
                                        line["S_hi"].to_numpy(float), color=colour, alpha=0.2, linewidth=0)
            curve = accuracy[(accuracy["method"] == method) & (accuracy["batch_size"] == size)]
            edited = curve[curve["n_edits"] > 0]
            if len(edited):
                xs, ys, half = edited["n_edits"].to_numpy(float), edited["value"].to_numpy(float), \
                    Z95 * edited["stderr"].to_numpy(float)
                axes[i][1].plot(xs, ys, color=colour, linewidth=1)
                axes[i][1].fill_between(xs, ys - half, ys + half, color=colour, alpha=0.2, linewidth=0)
            run = probed[(probed["method"] == method) & (probed["batch_size"] == size)].sort_values("n_edits")
            if len(run):
                axes[i][2].plot(run["n_edits"], run["agreement"], color=colour, linewidth=0.8)
        if accuracy.empty:
            axes[i][1].text(0.5, 0.5, "no downstream tasks configured", ha="center", va="center",
                            transform=axes[i][1].transAxes, fontsize=8)
        base = accuracy[(accuracy["batch_size"] == size) & (accuracy["n_edits"] == 0)]
        if len(base):  # every run of the row starts from the same unedited model
            unedited = float(base["value"].iloc[0])
            axes[i][1].axhline(unedited, color="black", linewidth=1, linestyle="--")
            axes[i][1].axhline(COLLAPSED * unedited, color="black", linewidth=1, linestyle=":")
        for j, (_, label) in enumerate(panels):
            axis = axes[i][j]
            axis.set_xscale("log", base=2)
            axis.set_xlim(1, probed["n_edits"].max() * 1.1)  # one edit-count range in every panel
            axis.set_xlabel(LABELS["n_edits"])
            axis.set_ylabel(label, fontsize=8)
            axis.set_title(f"b={int(size)}", fontsize=9)
    _share_range([axes[i][0] for i in range(len(sizes))], limits["S"])
    _share_range([axes[i][1] for i in range(len(sizes))], limits["accuracy"])
    _share_range([axes[i][2] for i in range(len(sizes))], (0.0, 1.0))
    handles = [Line2D([], [], color=colours[m], label=m) for m in methods]
    if not accuracy.empty:
        handles += [Line2D([], [], color="black", linewidth=1, linestyle="--", label=UNEDITED),
                    Line2D([], [], color="black", linewidth=1, linestyle=":", label=f"{COLLAPSED:g} x {UNEDITED}")]
    figure.legend(handles=handles, title="method", loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.suptitle(f"Editing until the model breaks ({title})", y=1.02)
    figure.tight_layout()
    _save(figure, path)


FIGURES = {
    "causal_trace": lambda t, p, title, y: causal_trace_figure(t["traces"], p, title, y),
    "layer_sweep": lambda t, p, title, y: layer_sweep_figure(t["layer_sweep"], p, title, y),
    "sensitivity": lambda t, p, title, y: sensitivity_figure(t["sensitivity"], p, title, y),
    "single_edits": lambda t, p, title, y: single_edits_figure(t["edits"], p, title, y),
    "batch_size": lambda t, p, title, y: batch_size_figure(t["edits"], p, title, y),
    "sequential": lambda t, p, title, y: sequential_figure(t["edits"], p, title, y),
    "batch_vs_sequential": lambda t, p, title, y: batch_vs_sequential_figure(t["edits"], p, title, y),
    "downstream": lambda t, p, title, y: downstream_figure(t["downstream"], p, title, y),
    "forgetting": lambda t, p, title, y: forgetting_figure(t["edits"], t["downstream"], t["steps"], p, title, y),
}


def write_figures(tables: dict[str, str | Path], outputs: dict[str, str | Path], title: str = "",
                  ablations: dict | None = None, y_limits: Mapping[str, Sequence[float]] | None = None) -> None:
    """Write every figure named in `outputs` (name -> png path) from the tidy tables
    (name -> csv path: edits, layer_sweep, sensitivity, downstream, traces); `ablations` (the config block)
    for the figures ablations_<kind>; `y_limits` (the config's figures.y_limits: metric -> [lo, hi])
    over each metric's full range (Y_LIMITS)."""
    from editlib.study.ablations import ablation_tables

    figure_limits(y_limits)  # a bad range fails before any figure is drawn
    sns.set_theme(style="whitegrid", context="paper")
    frames = {name: read_results(path) for name, path in tables.items()}
    for name, path in outputs.items():
        if name.startswith("ablations_"):  # one figure per ablation kind
            kind = name.removeprefix("ablations_")
            ablations_figure({kind: ablation_tables(frames["downstream"], {kind: (ablations or {})[kind]})[kind]}, path,
                             title, y_limits)
        else:
            FIGURES[name](frames, path, title, y_limits)
