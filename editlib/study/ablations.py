"""Lin et al.'s ablations: what each compares, and its tidy table.

Each kind under the config's `ablations` block compares arms of sequential editing by their
downstream accuracy: two method blocks on one model (edited layers, ROME's constraint), one
method at several batch sizes (an equal number of edits), or two models under the same method
block (model size, instruction tuning). `ablation_table` turns the downstream table into one tidy
table per kind (one row per arm, edit sample, task and checkpoint); the findings and the ablations
figure read those tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from editlib.study.tables import accuracy_drop, primary_metric


@dataclass(frozen=True)
class AblationKind:
    """One kind of ablation: the roles of its arms (in the order "less" -> "more" of what Lin et
    al. say mitigates the damage) and whether its arms are method blocks or models."""

    roles: tuple[str, str]
    arms: str  # "methods" (blocks under `methods`, on every model) or "models" (every sequential method)
    finding: str


KINDS = {
    "edited_layers": AblationKind(("shallow", "deep"), "methods", "deeper edited layers erode general abilities less"),
    "constraint": AblationKind(("without", "with"), "methods",
                               "ROME's covariance constraint limits the erosion of general abilities"),
    "model_size": AblationKind(("smaller", "larger"), "models", "larger models lose less general ability"),
    "instruction_tuning": AblationKind(("base", "chat"), "models", "instruction-tuned models lose less general ability"),
}
TABLE_COLUMNS = ["ablation", "comparison", "role", "model", "method", "batch_size", "sample", "n_edits", "task",
                 "value", "stderr", "change_stderr"]


def _sequential(downstream: pd.DataFrame) -> pd.DataFrame:
    if downstream.empty:
        return downstream
    data = primary_metric(downstream[downstream["experiment"] == "sequential"])
    return data if "sample" in data.columns else data.assign(sample=0)  # tables written before edit samples


def ablation_table(downstream: pd.DataFrame, kind: str, entries: list) -> pd.DataFrame:
    """The downstream rows of every arm of the configured `entries` of ablation `kind`, one per edit
    sample, labelled with the comparison and the arm's role. Pairs run at their smallest
    common batch size; `batch_size` entries (method names) keep every batch size, role "b=<size>"."""
    data = _sequential(downstream)
    frames = []
    if data.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    if kind == "batch_size":
        for method in entries:
            part = data[data["method"] == method]
            for model, runs in part.groupby("model", sort=False):
                if runs["batch_size"].nunique() < 2:
                    continue
                frames.append(runs.assign(ablation=kind, comparison=f"{method} on {model}",
                                          role="b=" + runs["batch_size"].astype(int).astype(str)))
    else:
        spec = KINDS[kind]
        for pair in entries:
            if spec.arms == "methods":
                groups = [(model, [(role, part[part["method"] == pair[role]]) for role in spec.roles])
                          for model, part in data.groupby("model", sort=False)]
                label = lambda model: f"{' vs '.join(pair[r] for r in spec.roles)} on {model}"  # noqa: E731
            else:
                groups = [(method, [(role, part[part["model"] == pair[role]]) for role in spec.roles])
                          for method, part in data.groupby("method", sort=False)]
                label = lambda method: f"{method}: {' vs '.join(pair[r] for r in spec.roles)}"  # noqa: E731
            for key, arms in groups:
                if any(arm.empty for _, arm in arms):
                    continue
                batch = min(set.intersection(*(set(arm["batch_size"]) for _, arm in arms)), default=None)
                if batch is None:
                    continue
                for role, arm in arms:
                    frames.append(arm[arm["batch_size"] == batch].assign(ablation=kind, comparison=label(key), role=role))
    if not frames:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    return pd.concat(frames, ignore_index=True).reindex(columns=TABLE_COLUMNS)  # change_stderr: absent from older tables


SAMPLE_COLUMNS = ["model", "method", "batch_size", "sample", "n_edits", "drop", "drop_lo", "drop_hi"]


def sample_table(downstream: pd.DataFrame) -> pd.DataFrame:
    """Each sequential run's accuracy drop (mean over tasks, unedited minus after the last
    checkpoint, +-1.96 SE) on each of its disjoint edit samples: the spread the figures draw."""
    if downstream.empty:  # no downstream tasks configured
        return pd.DataFrame(columns=SAMPLE_COLUMNS)
    data = primary_metric(downstream[downstream["experiment"] == "sequential"])
    if "sample" not in data.columns:  # tables written before runs had edit samples
        data = data.assign(sample=0)
    rows = []
    for (model, method, batch, sample), run in data.groupby(["model", "method", "batch_size", "sample"], sort=False):
        last = run["n_edits"].max()
        before, after = run[run["n_edits"] == 0], run[run["n_edits"] == last]
        if before.empty or last == 0:
            continue
        _, drop, lo, hi = accuracy_drop(before, after)
        rows.append({"model": model, "method": method, "batch_size": batch, "sample": sample, "n_edits": last,
                     "drop": drop, "drop_lo": lo, "drop_hi": hi})
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)


def ablation_tables(downstream: pd.DataFrame, ablations: dict | None) -> dict[str, pd.DataFrame]:
    """{kind: tidy table} for every kind in the config's `ablations` block."""
    return {kind: ablation_table(downstream, kind, entries) for kind, entries in (ablations or {}).items()}
