"""The tidy tables: their columns, reading and gathering them, and the views of them that the
findings, the ablations and the figures share. pandas only (the reporting jobs import no torch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from editlib.io import write_csv

METRICS = ["ES", "PS", "NS", "S", "EM", "PM", "NM", "GE"]
# 95% bootstrap interval over facts of every metric but GE (editlib.eval.metrics.bootstrap_intervals)
INTERVALS = [f"{name}_{bound}" for name in METRICS if name != "GE" for bound in ("lo", "hi")]
# `records`: counterfact (ES/PS/NS: the new object beats the true one) or zsre (ES/PS/NS: token
# accuracy of the edit, paraphrase and neighbourhood prompts), editlib.eval.metrics.per_record_metrics
# `sample`: which disjoint edit sample a sequential run edited (0 for the other experiments)
RESULT_COLUMNS = ["experiment", "model", "method", "layers", "batch_size", "sample", "n_edits", "step", "scope",
                  "records", *METRICS, *INTERVALS, "n_records"]
# Downstream: one row per configured lm-eval task and metric; a group (mmlu, bbh) is one task, its
# value lm-eval's aggregate over its subtasks (editlib.eval.downstream.task_rows). `n_items`: the items
# the value is over; `error`: empty, or why the task failed (its row then has no metric or value).
DOWNSTREAM_COLUMNS = ["experiment", "model", "method", "batch_size", "sample", "n_edits", "task", "metric", "value",
                      "stderr", "n_items", "error"]
# the leaf tasks of each configured group or tag (`group`: the configured name), kept apart so that
# they are never averaged with the configured tasks
DOWNSTREAM_SUBTASK_COLUMNS = ["experiment", "model", "method", "batch_size", "sample", "n_edits", "group", "task",
                              "metric", "value", "stderr", "n_items"]
# Sequential runs, one row per batch: how much the batch changed the edited weights relative to the
# unedited ones, as Frobenius norms and as the change of the layers' outputs over keys distributed as
# the statistics C (locate-and-edit methods, editing.editor.Editor._relative_norms; NaN for the
# others), and with experiments.sequential.probe the model's top-1 next-token agreement with the
# unedited model on the probe texts and the share of probe positions predicting its most frequent
# token (editlib.eval.collapse; NaN without a probe)
STEP_COLUMNS = ["experiment", "model", "method", "layers", "batch_size", "sample", "n_edits", "step",
                "relative_update_norm", "relative_output_change", "agreement", "top_token_share"]
# the sensitivity stage: single edits with one hyperparameter (`parameter`) set to `value`
SENSITIVITY_COLUMNS = [*RESULT_COLUMNS, "parameter", "value"]

Z95 = 1.959964
DOWNSTREAM_KEYS = ["experiment", "model", "method", "batch_size", "n_edits", "task", "metric"]


def read_results(path: str | Path) -> pd.DataFrame:
    """A results or downstream CSV written by the workflow (layer labels kept as strings); an
    empty file (no rows, no header) reads as an empty frame."""
    path = Path(path)
    return pd.read_csv(path, dtype={"layers": str}) if path.stat().st_size > 1 else pd.DataFrame()


def tidy(inputs: Sequence[str | Path], out_path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Concatenate per-job CSVs into one tidy table (empty inputs skipped)."""
    frames = [frame for frame in map(read_results, inputs) if not frame.empty]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns or []))
    write_csv(out_path, frame)
    return frame


def primary_metric(downstream: pd.DataFrame) -> pd.DataFrame:
    """One metric per task: acc where the task reports it (acc_norm is then skipped), else its first.
    The rows of failed evaluations (an `error`, no value) are left out."""
    if "error" in downstream.columns:
        downstream = downstream[downstream["error"].isna() | (downstream["error"] == "")]
    downstream = downstream[downstream["metric"].notna() & downstream["value"].notna()]
    keep = [group[group["metric"] == ("acc" if "acc" in set(group["metric"]) else group["metric"].iloc[0])]
            for _, group in downstream.groupby("task")]
    return pd.concat(keep, ignore_index=True) if keep else downstream


def mean_stderr(stderr: pd.Series) -> float:
    """The standard error of the mean of independent estimates with these standard errors (a missing
    one counts as 0): sqrt(sum se^2) / n."""
    return float(np.sqrt((stderr.fillna(0) ** 2).sum())) / len(stderr)


def over_samples(downstream: pd.DataFrame) -> pd.DataFrame:
    """Downstream rows averaged over a run's disjoint edit samples: `value` the mean, `stderr` the
    mean's standard error from the samples' own (sqrt(sum se^2) / n), `spread_lo` / `spread_hi`
    the smallest and largest sample's value, `n_samples` how many. One sample passes through."""
    if downstream.empty:
        return downstream.assign(spread_lo=[], spread_hi=[], n_samples=[])
    if "sample" not in downstream.columns:
        downstream = downstream.assign(sample=0)
    keys = [key for key in DOWNSTREAM_KEYS if key in downstream.columns]
    grouped = downstream.groupby(keys, sort=False, dropna=False)
    frame = grouped.agg(value=("value", "mean"), spread_lo=("value", "min"), spread_hi=("value", "max"),
                        n_samples=("sample", "nunique"), stderr_one=("stderr", "first"),
                        stderr=("stderr", mean_stderr))
    frame = frame.reset_index()
    # before any edit every sample's run measures the same model: one measurement, not n
    unedited = frame["n_edits"] == 0
    frame.loc[unedited, "stderr"] = frame.loc[unedited, "stderr_one"]
    return frame.drop(columns="stderr_one")


def accuracy_difference(first: pd.DataFrame, second: pd.DataFrame):
    """(per-task merge, value_a from `first` and value_b from `second`; the mean over tasks of
    second's minus first's accuracy; its 95% interval from the two sides' lm-eval standard errors)."""
    merged = first.merge(second, on="task", suffixes=("_a", "_b"))
    diff = float((merged["value_b"] - merged["value_a"]).mean())
    se = math.sqrt(float((merged["stderr_a"].fillna(0) ** 2 + merged["stderr_b"].fillna(0) ** 2).sum())) / len(merged)
    return merged, diff, diff - Z95 * se, diff + Z95 * se


def mean_accuracy_curve(downstream: pd.DataFrame) -> pd.DataFrame:
    """Per sequential run (model, method, batch_size) and edit count: the mean over tasks of the primary
    metric (averaged over edit samples) and its standard error (mean_stderr over the tasks); columns
    model, method, batch_size, n_edits, value, stderr, n_tasks."""
    columns = ["model", "method", "batch_size", "n_edits", "value", "stderr", "n_tasks"]
    data = downstream[downstream["experiment"] == "sequential"] if not downstream.empty else downstream
    data = over_samples(primary_metric(data)) if not data.empty else data
    if data.empty:
        return pd.DataFrame(columns=columns)
    grouped = data.groupby(["model", "method", "batch_size", "n_edits"], sort=False)
    frame = grouped.agg(value=("value", "mean"), n_tasks=("task", "nunique"), stderr=("stderr", mean_stderr))
    return frame.reset_index()[columns].sort_values(["model", "method", "batch_size", "n_edits"], ignore_index=True)


EDIT_KEYS = ["experiment", "model", "method", "layers", "batch_size", "n_edits", "step", "scope", "records"]


def edits_over_samples(edits: pd.DataFrame) -> pd.DataFrame:
    """Edit-metric rows averaged over a run's disjoint edit samples: each metric and each interval
    bound the mean of the samples' (so an interval is about as wide as one sample's), `n_samples`
    how many. One sample passes through."""
    if edits.empty or "sample" not in edits.columns or edits["sample"].nunique() < 2:
        return edits
    keys = [key for key in EDIT_KEYS if key in edits.columns]
    values = [c for c in edits.columns if c not in keys and c != "sample" and pd.api.types.is_numeric_dtype(edits[c])]
    grouped = edits.groupby(keys, sort=False, dropna=False)
    frame = grouped[values].mean().join(grouped["sample"].nunique().rename("n_samples"))
    return frame.reset_index()


def model_labelled(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """`column` suffixed with " | <model>" when the frame holds several models (figures that
    would otherwise draw two models' rows as one line)."""
    if frame.empty or "model" not in frame.columns or frame["model"].nunique() < 2:
        return frame
    return frame.assign(**{column: frame[column].astype(str) + " | " + frame["model"].astype(str)})


# ---------------------------------------------------------------------------- causal traces


def average_effects(traces: pd.DataFrame) -> pd.DataFrame:
    """AIE per (kind, token, layer), with the number of facts."""
    grouped = traces.groupby(["kind", "token", "layer"])
    return grouped["effect"].agg(["mean", "count"]).rename(columns={"mean": "AIE", "count": "n_facts"}).reset_index()


def peak_layer(traces: pd.DataFrame, kind: str = "mlp", token: str = "subject_last") -> int:
    """The layer with the largest average indirect effect of `kind` at `token`."""
    effects = average_effects(traces)
    effects = effects[(effects["kind"] == kind) & (effects["token"] == token)]
    return int(effects.loc[effects["AIE"].idxmax(), "layer"])
