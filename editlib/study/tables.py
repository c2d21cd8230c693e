"""The tidy tables: their columns, reading and gathering them, and the views of them that the
findings, the ablations and the figures share. pandas only (the reporting jobs import no torch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

from editlib.eval.metric_names import LOWER_IS_BETTER
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
# value lm-eval's aggregate over its subtasks (editlib.eval.downstream.task_rows). `higher_is_better`:
# the metric's direction as lm-eval reports it (False for perplexities; empty where lm-eval says
# nothing); `n_items`: the items the value is over; `error`: empty, or why the task failed (its row
# then has no metric or value). `change_stderr`: the standard error of the value's change from the
# unedited model's, paired item by item (the same questions and texts before and after; for word and
# byte perplexity the change of the log; editlib.eval.downstream.with_change_stderr), 0 on the
# unedited model's rows, empty where lm-eval's per-item values cannot give it (a corpus-level metric).
DOWNSTREAM_COLUMNS = ["experiment", "model", "method", "batch_size", "sample", "n_edits", "task", "metric",
                      "higher_is_better", "value", "stderr", "change_stderr", "n_items", "error"]
# the leaf tasks of each configured group or tag (`group`: the configured name), kept apart so that
# they are never averaged with the configured tasks
DOWNSTREAM_SUBTASK_COLUMNS = ["experiment", "model", "method", "batch_size", "sample", "n_edits", "group", "task",
                              "metric", "higher_is_better", "value", "stderr", "change_stderr", "n_items"]
# the fields of a downstream evaluation's rows (editlib.eval.downstream.evaluate_downstream), which
# the jobs label with the run's keys: the columns above from the task (the group) on
DOWNSTREAM_FIELDS = DOWNSTREAM_COLUMNS[DOWNSTREAM_COLUMNS.index("task"):]
SUBTASK_FIELDS = DOWNSTREAM_SUBTASK_COLUMNS[DOWNSTREAM_SUBTASK_COLUMNS.index("group"):]
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


def _scored(downstream: pd.DataFrame) -> pd.DataFrame:
    """The rows with a metric and a value (failed evaluations, with an `error`, left out)."""
    if "error" in downstream.columns:
        downstream = downstream[downstream["error"].isna() | (downstream["error"] == "")]
    return downstream[downstream["metric"].notna() & downstream["value"].notna()]




def _lower_is_better(downstream: pd.DataFrame) -> pd.Series:
    """Per row: whether its metric is lower-is-better, as lm-eval reported it on any row of the same
    task and metric (a row without a direction: by the metric's name, LOWER_IS_BETTER)."""
    said = (downstream["higher_is_better"] if "higher_is_better" in downstream.columns
            else pd.Series(None, index=downstream.index, dtype=object))
    lower = said.map(lambda v: v is False or v is np.False_ or str(v).lower() == "false")
    unsaid = said.isna() & downstream["metric"].isin(LOWER_IS_BETTER)
    return (lower | unsaid).groupby([downstream["task"], downstream["metric"]]).transform("any").astype(bool)


def primary_metric(downstream: pd.DataFrame) -> pd.DataFrame:
    """One accuracy per task, the metric every mean accuracy of the findings, ablations and figures
    averages: acc where the task reports it (acc_norm is then skipped), else its first metric that
    is not lower-is-better. A task whose metrics are all lower-is-better (a perplexity task) has no
    row here, since a mean accuracy cannot average it: `perplexity_metric` is its view. The rows of
    failed evaluations (an `error`, no value) are left out."""
    downstream = _scored(downstream)
    return _one_metric_per_task(downstream[~_lower_is_better(downstream)], "acc")


def perplexity_metric(downstream: pd.DataFrame) -> pd.DataFrame:
    """One lower-is-better metric per task that reports only such metrics (a perplexity task, which
    `primary_metric` leaves out): word_perplexity where reported, else its first."""
    downstream = _scored(downstream)
    lower = _lower_is_better(downstream)
    tasks = set(downstream.loc[lower, "task"]) - set(downstream.loc[~lower, "task"])
    return _one_metric_per_task(downstream[downstream["task"].isin(tasks)], "word_perplexity")


def _one_metric_per_task(downstream: pd.DataFrame, preferred: str) -> pd.DataFrame:
    """Per task the rows of `preferred` where the task reports it, else of its first metric."""
    keep = [group[group["metric"] == (preferred if preferred in set(group["metric"]) else group["metric"].iloc[0])]
            for _, group in downstream.groupby("task")]
    return pd.concat(keep, ignore_index=True) if keep else downstream


def mean_stderr(stderr: pd.Series) -> float:
    """The standard error of the mean of independent estimates with these standard errors (a missing
    one counts as 0): sqrt(sum se^2) / n."""
    return float(np.sqrt((stderr.fillna(0) ** 2).sum())) / len(stderr)


def t95(dof: int) -> float:
    """The 0.975 quantile of Student's t with `dof` degrees of freedom (a 95% interval's multiplier)."""
    return float(scipy.stats.t.ppf(0.975, dof))


def sample_mean_error(values: Sequence[float], stderrs: Sequence[float]) -> tuple[float, float, float]:
    """(mean, standard error, 95% half-width) of the mean of k measurements, one per disjoint edit
    sample, each with its own standard error (lm-eval's, over the questions). The samples differ by
    which facts were edited as well as by question noise, so the error is the larger of
      - the samples' own: sqrt(mean se^2 / k), interval +-1.96 SE, and
      - their spread: sd / sqrt(k), interval +-t(k-1) SE (Student's t, for an sd from k values),
    the method-of-moments estimate of a random sample effect (its variance sd^2 - mean se^2, taken
    as 0 where negative). Each measurement's question noise is taken as independent of the others',
    as everywhere in these tables (lm-eval's convention, though the samples answer the same
    questions). One measurement passes through."""
    values, stderrs = np.asarray(values, float), np.nan_to_num(np.asarray(stderrs, float))
    k = len(values)
    within = float(np.mean(stderrs ** 2)) / k
    between = float(np.var(values, ddof=1)) / k if k > 1 else 0.0
    stderr = math.sqrt(max(within, between))
    return float(values.mean()), stderr, (t95(k - 1) if between > within else Z95) * stderr


def over_samples(downstream: pd.DataFrame, keys: Sequence[str] = ()) -> pd.DataFrame:
    """Downstream rows averaged over a run's disjoint edit samples (grouped by the downstream keys
    and any extra `keys`): `value` the mean, `stderr` its standard error (sample_mean_error: the
    samples' own or their spread, whichever is larger), `spread_lo` / `spread_hi` the smallest and
    largest sample's value, `n_samples` how many. Before any edit (n_edits 0) every sample's run
    measured the same model: one measurement, its own standard error. One sample passes through."""
    if downstream.empty:
        return downstream.assign(spread_lo=[], spread_hi=[], n_samples=[])
    if "sample" not in downstream.columns:
        downstream = downstream.assign(sample=0)
    keys = [key for key in [*keys, *DOWNSTREAM_KEYS] if key in downstream.columns]
    rows = []
    for key, group in downstream.groupby(keys, sort=False, dropna=False):
        mean = task_mean(group)  # one task: each sample's value is its mean over tasks
        rows.append({**dict(zip(keys, key)), "value": mean.value, "spread_lo": group["value"].min(),
                     "spread_hi": group["value"].max(), "n_samples": group["sample"].nunique(), "stderr": mean.stderr})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class TaskMean:
    """One run's accuracy at one checkpoint, as the mean over tasks (averaged over its edit
    samples): `value`, `stderr` and the 95% `half_width` (tables.sample_mean_error on the samples'
    means over tasks); `samples`: each sample's mean over tasks and its standard error (index: the
    sample); `edited`: False before any edit, where the samples measured one model."""

    value: float
    stderr: float
    half_width: float
    samples: pd.DataFrame
    edited: bool


def task_mean(rows: pd.DataFrame) -> TaskMean:
    """The mean over tasks of one run at one checkpoint (rows: task, value, stderr, optionally
    sample and n_edits). A sample's effect reaches every task at once (an edit that breaks the model
    breaks them all), so the samples' spread is taken between their means over tasks, not task by
    task. Before any edit (n_edits 0 only) the samples measured one model: its own error."""
    if "sample" not in rows.columns:
        rows = rows.assign(sample=0)
    samples = rows.groupby("sample", sort=True).agg(value=("value", "mean"), stderr=("stderr", mean_stderr))
    edited = not ("n_edits" in rows.columns and (rows["n_edits"] == 0).all())
    if not edited:
        samples = samples.iloc[:1]
    value, stderr, half = sample_mean_error(samples["value"], samples["stderr"])
    return TaskMean(value, stderr, half, samples, edited)


def paired_with_unedited(first: pd.DataFrame, second: pd.DataFrame) -> bool:
    """Whether `second`'s change from `first` has item-paired errors: `first` is the unedited model
    (n_edits 0) and every row of `second` carries its `change_stderr` from it."""
    return (not task_mean(first).edited and "change_stderr" in second.columns
            and bool(second["change_stderr"].notna().all()))


def accuracy_difference(first: pd.DataFrame, second: pd.DataFrame):
    """(per-task merge of the sample-averaged values, value_a from `first` and value_b from
    `second`; the mean over tasks of second's minus first's accuracy; its 95% interval). Each side
    is one run at one checkpoint (tables.task_mean, its samples' spread included).
    - An edited run against the unedited model whose rows carry `change_stderr`
      (`paired_with_unedited`): the same questions before and after, so the interval comes from
      those item-paired errors: per edit sample the mean over tasks of the changes, its error
      `mean_stderr` of theirs, combined over samples by `sample_mean_error`.
    - Two edited runs on the same edit samples: the interval comes from the per-sample differences
      (the facts a sample holds weigh on both runs).
    - Otherwise the sides are taken as independent and the half-width is the hypotenuse of theirs."""
    a, b = task_mean(first), task_mean(second)
    merged = _task_values(first).merge(_task_values(second), on="task", suffixes=("_a", "_b"))
    diff = float((merged["value_b"] - merged["value_a"]).mean())
    if paired_with_unedited(first, second):
        changes = second.assign(sample=second["sample"] if "sample" in second.columns else 0)
        changes = changes.merge(_task_values(first).rename(columns={"value": "before"}), on="task")
        per_sample = (changes.assign(change=changes["value"] - changes["before"]).groupby("sample", sort=True)
                      .agg(change=("change", "mean"), stderr=("change_stderr", mean_stderr)))
        _, _, half = sample_mean_error(per_sample["change"], per_sample["stderr"])
    elif a.edited and b.edited and len(a.samples) > 1 and a.samples.index.equals(b.samples.index):
        paired = b.samples["value"] - a.samples["value"]
        _, _, half = sample_mean_error(paired, np.hypot(a.samples["stderr"], b.samples["stderr"]))
    else:
        half = math.hypot(a.half_width, b.half_width)
    return merged, diff, diff - half, diff + half


def accuracy_drop(before: pd.DataFrame, after: pd.DataFrame):
    """(per-task merge as `accuracy_difference`; the mean accuracy over tasks lost from `before` to
    `after`; its 95% interval): `accuracy_difference` negated, so that a drop from the unedited
    model takes the item-paired errors where the rows carry them."""
    merged, gain, lo, hi = accuracy_difference(before, after)
    return merged, 0.0 - gain, 0.0 - hi, 0.0 - lo  # 0.0 - x: no negative zero


def _task_values(rows: pd.DataFrame) -> pd.DataFrame:
    """Per task: the value averaged over samples."""
    return rows.groupby("task", sort=False)["value"].mean().reset_index()


def mean_accuracy_curve(downstream: pd.DataFrame) -> pd.DataFrame:
    """Per sequential run (model, method, batch_size) and edit count: the mean over tasks of the primary
    metric, averaged over edit samples, and its standard error (tables.task_mean); columns model,
    method, batch_size, n_edits, value, stderr, n_tasks."""
    columns = ["model", "method", "batch_size", "n_edits", "value", "stderr", "n_tasks"]
    data = downstream[downstream["experiment"] == "sequential"] if not downstream.empty else downstream
    data = primary_metric(data) if not data.empty else data
    if data.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for (model, method, batch, n_edits), part in data.groupby(["model", "method", "batch_size", "n_edits"], sort=False):
        mean = task_mean(part)
        rows.append({"model": model, "method": method, "batch_size": batch, "n_edits": n_edits, "value": mean.value,
                     "stderr": mean.stderr, "n_tasks": part["task"].nunique()})
    return pd.DataFrame(rows, columns=columns).sort_values(["model", "method", "batch_size", "n_edits"], ignore_index=True)


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
