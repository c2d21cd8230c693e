"""The papers' findings checked against a run's tidy tables, each with its numbers and a verdict.

Every check compares estimates with their 95% intervals (bootstrap over facts for edit metrics;
for downstream accuracies +-1.96 lm-eval standard errors, or Student's t over a run's disjoint
edit samples where their spread is the larger error) and says "reproduced" only when the
difference the paper reports is larger than the intervals: overlapping intervals give
"inconclusive", a difference the other way "not reproduced". A finding whose experiment is not
in the run is left out.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from editlib.eval.metric_names import LOG_CHANGE_METRICS
from editlib.io import atomic_path
from editlib.study.ablations import KINDS, sample_table
from editlib.study.tables import (
    Z95,
    accuracy_difference,
    accuracy_drop,
    average_effects,
    edits_over_samples,
    mean_accuracy_curve,
    paired_with_unedited,
    peak_layer,
    perplexity_metric,
    primary_metric,
)

FINDING_COLUMNS = ["study", "finding", "model", "method", "evidence", "verdict"]
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
KEEP_MARGIN = 0.05  # largest accuracy drop (mean over tasks) an interval may allow for abilities to count as kept
PERPLEXITY_KEEP_MARGIN = 0.05  # largest relative perplexity rise an interval may allow for abilities to count as kept


def _interval(row, metric: str) -> str:
    return f"{row[metric]:.1f} [{row[f'{metric}_lo']:.1f}, {row[f'{metric}_hi']:.1f}]"


def _compare(higher, lower, metric: str) -> str:
    """Verdict for "higher[metric] > lower[metric]" from their 95% intervals."""
    if higher[f"{metric}_lo"] > lower[f"{metric}_hi"]:
        return REPRODUCED
    if higher[f"{metric}_hi"] < lower[f"{metric}_lo"]:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def tracing_matches_sweep(traces: pd.DataFrame, sweep: pd.DataFrame, criterion: str = "S") -> list[dict]:
    """Meng et al.: the layers where restoring the subject's last-token MLP output recovers the
    fact are the layers where editing that token works best (the sweep's best layer within one
    layer of the tracing peak)."""
    if traces.empty or sweep.empty:
        return []
    peak = peak_layer(traces, "mlp", "subject_last")
    effects = average_effects(traces)
    peak_effect = effects[(effects["kind"] == "mlp") & (effects["token"] == "subject_last")]["AIE"].max()
    n_facts = traces.loc[(traces["kind"] == "mlp") & (traces["token"] == "subject_last"), "case_id"].nunique()
    rows = []
    for method, part in sweep.groupby("method", sort=False):
        part = part.assign(layer=part["layers"].astype(int)).sort_values("layer")
        best = part.loc[part[criterion].idxmax()]
        agree = abs(int(best["layer"]) - peak) <= 1
        evidence = (f"tracing: subject-last MLP effect peaks at layer {peak} (AIE {peak_effect:.3f} over "
                    f"{n_facts} facts); sweep: best {criterion} at layer {int(best['layer'])} "
                    f"({_interval(best, criterion)})")
        rows.append({"study": "Meng et al. 2022", "finding": "causal tracing locates the layers where editing works",
                     "method": method, "evidence": evidence, "verdict": REPRODUCED if agree else NOT_REPRODUCED})
    return rows


def ns_falls_with_batch_size(edits: pd.DataFrame) -> list[dict]:
    """Yoon et al.: neighbourhood score falls as the batch size grows (smallest vs largest batch)."""
    if edits.empty:
        return []
    data = edits[edits["experiment"] == "batched"]
    rows = []
    for method, part in data.groupby("method", sort=False):
        part = part.sort_values("batch_size")
        if len(part) < 2:
            continue
        small, large = part.iloc[0], part.iloc[-1]
        trend = " -> ".join(f"{row['NS']:.1f}" for _, row in part.iterrows())
        evidence = (f"NS at batch {int(small['batch_size'])}: {_interval(small, 'NS')}; at batch "
                    f"{int(large['batch_size'])}: {_interval(large, 'NS')} (sizes {', '.join(map(str, part['batch_size'].astype(int)))}: {trend})")
        rows.append({"study": "Yoon et al. 2024", "finding": "NS falls as the batch size grows", "method": method,
                     "evidence": evidence, "verdict": _compare(small, large, "NS")})
    return rows


def sequential_beats_one_batch(edits: pd.DataFrame, metric: str = "S") -> list[dict]:
    """Yoon et al.: after the same number of edits, sequential smaller batches score better than
    one batch of all of them (best smaller batch vs the single batch)."""
    if edits.empty:
        return []
    data = edits_over_samples(edits[(edits["experiment"] == "sequential") & (edits["scope"] == "edited_so_far")])
    rows = []
    for method, part in data.groupby("method", sort=False):
        total = part["n_edits"].max()
        final = part[part["n_edits"] == total].sort_values("batch_size")
        one_batch = final[final["batch_size"] == total]
        smaller = final[final["batch_size"] < total]
        if one_batch.empty or smaller.empty:
            continue
        one = one_batch.iloc[0]
        best = smaller.loc[smaller[metric].idxmax()]
        listing = ", ".join(f"b={int(r['batch_size'])}: {r[metric]:.1f}" for _, r in final.iterrows())
        evidence = (f"{metric} on all {int(total)} edited facts: one batch {_interval(one, metric)}; best sequential "
                    f"b={int(best['batch_size'])} {_interval(best, metric)} ({listing})")
        rows.append({"study": "Yoon et al. 2024", "finding": f"{int(total)} edits in sequential smaller batches beat one batch",
                     "method": method, "evidence": evidence, "verdict": _compare(best, one, metric)})
    return rows


def _positive_verdict(lo: float, hi: float) -> str:
    """Verdict for a claimed positive difference from its interval."""
    return REPRODUCED if lo > 0 else (NOT_REPRODUCED if hi < 0 else INCONCLUSIVE)


def _erosion_verdict(lo: float, hi: float, preserving: bool, margin: float) -> str:
    """Verdict on an erosion interval [lo, hi]: for a parameter-modifying editor, erosion claimed
    (`_positive_verdict`); for a parameter-preserving one, none claimed: no detectable erosion, and
    an interval that rules out one of `margin`."""
    if not preserving:
        return _positive_verdict(lo, hi)
    return NOT_REPRODUCED if lo > 0 else (REPRODUCED if hi < margin else INCONCLUSIVE)


def downstream_erosion(downstream: pd.DataFrame, preserving: tuple[str, ...] = ("grace",)) -> list[dict]:
    """Lin et al.: parameter-modifying editors erode general abilities under sequential editing,
    the parameter-preserving GRACE does not. Per method and batch size, mean accuracy over tasks
    before editing vs after the last checkpoint; the difference's 95% interval from lm-eval's
    standard errors, or from the edit samples' spread where that is larger (tables.accuracy_difference)."""
    if downstream.empty:
        return []
    data = downstream[downstream["experiment"] == "sequential"]
    if data.empty:
        return []
    per_sample = primary_metric(data)
    rows = []
    for (method, batch), part in per_sample.groupby(["method", "batch_size"], sort=False):
        last = part["n_edits"].max()
        before, after = part[part["n_edits"] == 0], part[part["n_edits"] == last]
        if before.empty or last == 0:
            continue
        merged, drop, lo, hi = accuracy_drop(before, after)
        verdict = _erosion_verdict(lo, hi, method in preserving, KEEP_MARGIN)
        if method in preserving:
            finding = "the parameter-preserving editor keeps general abilities (no drop beyond its interval)"
        else:
            finding = "sequential edits erode general abilities"
        tasks = ", ".join(f"{r['task']} {r['value_a']:.2f}->{r['value_b']:.2f}" for _, r in merged.iterrows())
        evidence = f"mean accuracy drop after {int(last)} edits (b={int(batch)}): {drop:+.3f} [{lo:+.3f}, {hi:+.3f}] ({tasks})"
        if paired_with_unedited(before, after):
            evidence += "; interval paired question by question"
        n_samples = int(part["sample"].nunique()) if "sample" in part.columns else 1
        if n_samples > 1:
            drops = sample_table(per_sample[(per_sample["method"] == method) & (per_sample["batch_size"] == batch)])
            evidence += f"; mean of {n_samples} disjoint edit samples, whose drops are " + ", ".join(
                f"{drop:+.3f}" for drop in drops["drop"])
        rows.append({"study": "Lin et al. 2024", "finding": finding, "method": f"{method} b={int(batch)}",
                     "evidence": evidence, "verdict": verdict})
    return rows


def perplexity_erosion(downstream: pd.DataFrame, preserving: tuple[str, ...] = ("grace",)) -> list[dict]:
    """Lin et al.'s erosion seen on held-out text instead of on tasks: per perplexity task (a task
    whose metrics are all lower-is-better, tables.perplexity_metric), method and batch size, the
    perplexity after the last checkpoint relative to before editing. The interval is that of the
    difference of log perplexities (item-paired where the rows carry `change_stderr`, else from
    the standard errors se / value), combined as `accuracy_difference` combines accuracies, and
    shown as a relative change; the verdicts are those of
    `downstream_erosion`, with a relative rise of PERPLEXITY_KEEP_MARGIN as the kept margin."""
    if downstream.empty:
        return []
    data = perplexity_metric(downstream[downstream["experiment"] == "sequential"])
    data = data[data["value"] > 0]
    if data.empty:
        return []
    logs = data.assign(value=np.log(data["value"].astype(float)), stderr=data["stderr"] / data["value"])
    if "change_stderr" in logs.columns:  # item-paired errors of the log: word and byte perplexity's only
        logs["change_stderr"] = logs["change_stderr"].where(logs["metric"].isin(LOG_CHANGE_METRICS))
    rows = []
    for (task, method, batch), part in logs.groupby(["task", "method", "batch_size"], sort=False):
        last = part["n_edits"].max()
        before, after = part[part["n_edits"] == 0], part[part["n_edits"] == last]
        if before.empty or last == 0:
            continue
        _, log_rise, lo, hi = accuracy_difference(before, after)
        rise, lo, hi = math.expm1(log_rise), math.expm1(lo), math.expm1(hi)
        verdict = _erosion_verdict(lo, hi, method in preserving, PERPLEXITY_KEEP_MARGIN)
        if method in preserving:
            finding = "the parameter-preserving editor keeps perplexity on held-out text (no rise beyond its interval)"
        else:
            finding = "sequential edits raise perplexity on held-out text"
        metric = part["metric"].iloc[0]
        evidence = (f"{metric} on {task} after {int(last)} edits (b={int(batch)}): {math.exp(before['value'].mean()):.2f} -> "
                    f"{math.exp(after['value'].mean()):.2f}, {rise:+.1%} [{lo:+.1%}, {hi:+.1%}]")
        if paired_with_unedited(before, after):
            evidence += "; interval paired text by text"
        rows.append({"study": "Lin et al. 2024", "finding": finding, "method": f"{method} b={int(batch)}",
                     "evidence": evidence, "verdict": verdict})
    return rows


def bigger_batches_erode_less(downstream: pd.DataFrame) -> list[dict]:
    """Lin et al. (ablation): at an equal number of sequential edits, bigger batches erode general
    abilities less. Per method run at several batch sizes: mean accuracy over tasks after the last
    checkpoint with the largest batch minus with the smallest; both runs start from the same
    unedited model, so the difference's interval comes from the two final accuracies' errors."""
    if downstream.empty:
        return []
    data = primary_metric(downstream[downstream["experiment"] == "sequential"])
    rows = []
    for method, part in data.groupby("method", sort=False):
        last = part["n_edits"].max()
        final = part[part["n_edits"] == last]
        sizes = sorted(final["batch_size"].unique())
        if last == 0 or len(sizes) < 2:
            continue
        small, large = final[final["batch_size"] == sizes[0]], final[final["batch_size"] == sizes[-1]]
        _, gain, lo, hi = accuracy_difference(small, large)
        means = final.groupby(["batch_size", "task"])["value"].mean().groupby("batch_size").mean()
        listing = ", ".join(f"b={int(b)}: {v:.3f}" for b, v in means.items())
        evidence = (f"mean accuracy after {int(last)} edits, b={int(sizes[-1])} minus b={int(sizes[0])}: "
                    f"{gain:+.3f} [{lo:+.3f}, {hi:+.3f}] ({listing})")
        rows.append({"study": "Lin et al. 2024", "finding": "bigger batches erode general abilities less (equal edits)",
                     "method": method, "evidence": evidence, "verdict": _positive_verdict(lo, hi)})
    return rows


def projection_erodes_less(downstream: pd.DataFrame) -> list[dict]:
    """Fang et al. 2025 (AlphaEdit): projecting the update onto the null space of the preserved keys
    keeps general abilities through sequential editing where MEMIT erodes them. Per batch size run by
    both a block named alphaedit<suffix> and memit<suffix> (alphaedit-5layer against memit-5layer):
    mean accuracy over tasks at the largest edit count both runs evaluated, AlphaEdit's minus
    MEMIT's, its interval as in `accuracy_difference` (paired by edit sample where the runs have
    several)."""
    if downstream.empty:
        return []
    data = primary_metric(downstream[downstream["experiment"] == "sequential"])
    rows = []
    for method in dict.fromkeys(m for m in data["method"] if m.startswith("alphaedit")):
        partner = "memit" + method.removeprefix("alphaedit")
        for batch in sorted(set(data.loc[data["method"] == method, "batch_size"])):
            runs = {m: data[(data["method"] == m) & (data["batch_size"] == batch)] for m in (partner, method)}
            if runs[partner].empty:
                continue
            last = max(set(runs[partner]["n_edits"]) & set(runs[method]["n_edits"]), default=0)
            if last == 0:
                continue
            final = {m: run[run["n_edits"] == last] for m, run in runs.items()}
            merged, gain, lo, hi = accuracy_difference(final[partner], final[method])
            evidence = (f"mean accuracy after {int(last)} edits (b={int(batch)}), {method} minus {partner}: "
                        f"{gain:+.3f} [{lo:+.3f}, {hi:+.3f}] ({partner} {merged['value_a'].mean():.3f}, "
                        f"{method} {merged['value_b'].mean():.3f})")
            rows.append({"study": "Fang et al. 2025 (AlphaEdit)",
                         "finding": "null-space projection erodes general abilities less than MEMIT (equal edits)",
                         "method": f"{method} b={int(batch)}", "evidence": evidence, "verdict": _positive_verdict(lo, hi)})
    return rows


def ablation_findings(tables: dict[str, pd.DataFrame]) -> list[dict]:
    """Lin et al.'s ablations (editlib.study.ablations): for each compared pair, the arm that should
    erode less ("deep", "with", "larger", "chat") against the other, by the mean over tasks of
    the accuracy lost after the last common checkpoint, with its 95% interval (each arm's error the
    larger of lm-eval's and its edit samples' spread, tables.task_mean). Arms on one model share the
    unedited accuracies, so their final accuracies are compared; arms on two models, their drops
    from each model's own unedited accuracy (both need the n_edits 0 rows)."""
    rows = []
    for kind, table in tables.items():
        if kind not in KINDS or table.empty:
            continue
        less, more = KINDS[kind].roles
        for comparison, part in table.groupby("comparison", sort=False):
            a, b = part[part["role"] == less], part[part["role"] == more]
            last = min(a["n_edits"].max(), b["n_edits"].max())
            if last == 0:
                continue
            a_last, b_last = a[a["n_edits"] == last], b[b["n_edits"] == last]
            same_model = set(a["model"]) == set(b["model"])
            if same_model:
                _, diff, lo, hi = accuracy_difference(a_last, b_last)
                what = f"final accuracy, {more} minus {less}"
            else:
                a_base, b_base = a[a["n_edits"] == 0], b[b["n_edits"] == 0]
                if a_base.empty or b_base.empty:
                    continue
                _, drop_a, lo_a, _ = accuracy_drop(a_base, a_last)
                _, drop_b, lo_b, _ = accuracy_drop(b_base, b_last)
                diff = drop_a - drop_b
                half = math.hypot(drop_a - lo_a, drop_b - lo_b)
                lo, hi = diff - half, diff + half
                what = f"accuracy drop, {less} ({drop_a:+.3f}) minus {more} ({drop_b:+.3f})"
            batch = int(part["batch_size"].iloc[0])
            evidence = f"after {int(last)} edits (b={batch}), {what}: {diff:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            rows.append({"study": "Lin et al. 2024", "finding": KINDS[kind].finding,
                         "model": ", ".join(dict.fromkeys(part["model"])), "method": comparison,
                         "evidence": evidence, "verdict": _positive_verdict(lo, hi)})
    return rows


def grace_generalises_poorly(edits: pd.DataFrame) -> list[dict]:
    """Lin et al.: GRACE makes its edits (high ES) but generalises poorly to rephrasings (low PS)."""
    if edits.empty:
        return []
    data = edits_over_samples(edits[(edits["method"] == "grace") & (edits["scope"] == "edited_so_far")])
    if data.empty:
        return []
    row = data.sort_values(["n_edits", "batch_size"]).iloc[-1]
    evidence = f"after {int(row['n_edits'])} edits (b={int(row['batch_size'])}): ES {_interval(row, 'ES')}, PS {_interval(row, 'PS')}"
    verdict = REPRODUCED if row["ES_lo"] > row["PS_hi"] else (NOT_REPRODUCED if row["ES_hi"] < row["PS_lo"] else INCONCLUSIVE)
    return [{"study": "Lin et al. 2024", "finding": "GRACE edits but generalises poorly to paraphrases",
             "method": "grace", "evidence": evidence, "verdict": verdict}]


# ---------------------------------------------------------------------------- the long run
# Long sequential runs (a run with experiments.sequential.probe: its per-batch table has probe values).
COLLAPSED = 0.5   # mean downstream accuracy below this fraction of the unedited model's: collapsed
GRADUAL = 0.8     # at or above this fraction of it: still forgetting gradually
DISABLING = 0.5   # one edit after which the probe agreement is below this fraction of its value before the edit
BROKEN = 0.5      # ... counted while the agreement before the edit is at least this (the model not yet broken)
SPIKE = 10.0      # an edit whose update norm exceeds this many times the median of the edits before it: a norm spike


def _probed(steps: pd.DataFrame | None) -> pd.DataFrame:
    if steps is None or steps.empty or "agreement" not in steps.columns:
        return pd.DataFrame()
    return steps[steps["agreement"].notna()]


def collapse_points(downstream: pd.DataFrame) -> pd.DataFrame:
    """Per sequential run (model, method, batch_size), from the mean accuracy over tasks at its
    evaluated edit counts (tables.mean_accuracy_curve; point estimates): `unedited` (n_edits 0);
    `collapse_at`, the first count below COLLAPSED x unedited (NaN: none), and `collapse_after`, the
    count evaluated before it, so the collapse happened in (collapse_after, collapse_at]; `gradual_until`,
    the last count before the collapse (or the run's end) still at least GRADUAL x unedited; `last`,
    the run's last count and `lowest`/`lowest_at` its lowest accuracy."""
    rows = []
    for (model, method, batch), curve in mean_accuracy_curve(downstream).groupby(["model", "method", "batch_size"],
                                                                                  sort=False):
        base = curve[curve["n_edits"] == 0]
        edited = curve[curve["n_edits"] > 0].sort_values("n_edits")
        if base.empty or edited.empty:
            continue
        unedited = float(base["value"].iloc[0])
        below = edited[edited["value"] < COLLAPSED * unedited]
        collapse_at = float(below["n_edits"].iloc[0]) if len(below) else math.nan
        before = curve[(curve["n_edits"] < collapse_at) if len(below) else curve["n_edits"] >= 0]
        kept = before[before["value"] >= GRADUAL * unedited]
        lowest = edited.loc[edited["value"].idxmin()]
        at = {int(n): (float(v), float(se)) for n, v, se in zip(curve["n_edits"], curve["value"], curve["stderr"])}
        rows.append({"model": model, "method": method, "batch_size": int(batch), "unedited": unedited,
                     "collapse_at": collapse_at, "collapse_after": float(before["n_edits"].max()),
                     "gradual_until": float(kept["n_edits"].max()) if len(kept) else math.nan,
                     "last": float(edited["n_edits"].max()), "lowest": float(lowest["value"]),
                     "lowest_at": float(lowest["n_edits"]), "accuracy": at})
    return pd.DataFrame(rows)


def _accuracy(point: dict, n: float) -> str:
    value, se = point["accuracy"][int(n)]
    return f"{value:.3f} +-{Z95 * se:.3f}"


def gradual_then_catastrophic(downstream: pd.DataFrame, steps: pd.DataFrame | None) -> list[dict]:
    """Gupta, Rao, Anumanchipalli 2024: under sequential editing a model first forgets gradually,
    then collapses. Per long run (one with the probe): reproduced when its mean downstream accuracy
    stays at least GRADUAL x unedited for some edits and then falls below COLLAPSED x unedited within
    one doubling of the edit count (collapse_at <= 2 x gradual_until); not reproduced when it never
    falls below COLLAPSED x unedited, or falls without a gradual phase or over more than a doubling."""
    probed = _probed(steps)
    if probed.empty:
        return []
    runs = set(zip(probed["method"], probed["batch_size"]))
    rows = []
    for _, point in collapse_points(downstream).iterrows():
        if (point["method"], point["batch_size"]) not in runs:
            continue
        u, collapsed = point["unedited"], not math.isnan(point["collapse_at"])
        evidence = f"mean accuracy unedited {u:.3f}; "
        if not collapsed:
            verdict = NOT_REPRODUCED
            evidence += (f"never below {COLLAPSED:.0%} of it through {int(point['last'])} edits (lowest "
                         f"{_accuracy(point, point['lowest_at'])} at {int(point['lowest_at'])})")
        else:
            gradual = point["gradual_until"]
            abrupt = not math.isnan(gradual) and point["collapse_at"] <= 2 * gradual
            verdict = REPRODUCED if abrupt else NOT_REPRODUCED
            kept = (f"at least {GRADUAL:.0%} of it through {int(gradual)} edits ({_accuracy(point, gradual)})"
                    if not math.isnan(gradual) else f"below {GRADUAL:.0%} of it from the first edit")
            evidence += (f"{kept}; first below {COLLAPSED:.0%} at {int(point['collapse_at'])} edits "
                         f"({_accuracy(point, point['collapse_at'])}; collapse between {int(point['collapse_after'])} "
                         f"and {int(point['collapse_at'])} edits)")
        run = probed[(probed["method"] == point["method"]) & (probed["batch_size"] == point["batch_size"])]
        low = run[run["agreement"] < BROKEN]
        if len(low):
            evidence += f"; probe agreement first below {BROKEN} after {int(low['n_edits'].min())} edits"
        rows.append({"study": "Gupta, Rao, Anumanchipalli 2024",
                     "finding": "sequential editing forgets gradually, then collapses (downstream accuracy below half)",
                     "method": f"{point['method']} b={point['batch_size']}", "evidence": evidence, "verdict": verdict})
    return rows


def _norms(run: pd.DataFrame, first) -> dict:
    """The first disabling edit's weight change and the run's median and largest, by the output change
    over the statistics' keys where the method has it, else the Frobenius norm (tables.STEP_COLUMNS)."""
    column = "relative_output_change" if run.get("relative_output_change", pd.Series(dtype=float)).notna().any() \
        else "relative_update_norm"
    values = run[column]
    return {"norm": column, "first_norm": float(first[column]) if first is not None else math.nan,
            "median_norm": float(values.median()), "largest_norm": float(values.max()),
            "largest_at": int(run.loc[values.idxmax(), "n_edits"]) if values.notna().any() else -1}


NORM_NAMES = {"relative_output_change": "output change over the statistics' keys", "relative_update_norm": "update norm"}


def disabling_edit_counts(steps: pd.DataFrame | None) -> pd.DataFrame:
    """Per probed one-at-a-time run (model, method): its single edits after which the probe agreement
    fell below DISABLING x its value before that edit while that value was at least BROKEN; columns
    model, method, n_edits (run length), disabling (the counts of those edits, in order), agreement
    before/after the first, and the weight change (`norm`: its measure, _norms) of the first, the
    median edit and the largest with where it was; norm_spikes: the edits whose Frobenius update
    norm exceeds SPIKE x the median of the edits before it (how the papers spot disabling edits)."""
    probed = _probed(steps)
    rows = []
    if probed.empty:
        return pd.DataFrame(rows)
    for (model, method), run in probed[probed["batch_size"] == 1].groupby(["model", "method"], sort=False):
        run = run.sort_values("n_edits")
        before = run["agreement"].shift(fill_value=1.0)  # the unedited model agrees with itself
        hits = run[(run["agreement"] < DISABLING * before) & (before >= BROKEN)]
        first = hits.iloc[0] if len(hits) else None
        norms = run["relative_update_norm"]
        spikes = run[norms > SPIKE * norms.expanding().median().shift()]
        rows.append({"model": model, "method": method, "n_edits": int(run["n_edits"].max()),
                     "disabling": [int(n) for n in hits["n_edits"]],
                     "norm_spikes": [int(n) for n in spikes["n_edits"]],
                     "first_before": float(before[hits.index[0]]) if first is not None else math.nan,
                     "first_after": float(first["agreement"]) if first is not None else math.nan,
                     **_norms(run, first)})
    return pd.DataFrame(rows)


def disabling_edits(steps: pd.DataFrame | None) -> list[dict]:
    """Gupta et al. 2024 ("Rebuilding ROME"): some single ROME edits disable the model, and r-ROME,
    whose update uses the same key as its target, makes none. An edit is disabling when the probe's
    top-1 agreement with the unedited model falls below DISABLING x its value before the edit (while
    that value is at least BROKEN). ROME: reproduced when it makes one; r-ROME: reproduced when it
    makes none and ROME does, inconclusive when neither does."""
    counts = disabling_edit_counts(steps)
    if counts.empty:
        return []
    rows = []
    for model, part in counts.groupby("model", sort=False):
        by_method = {row["method"]: row for _, row in part.iterrows()}
        rome = len(by_method["rome"]["disabling"]) if "rome" in by_method else None
        for method, finding in (("rome", "ROME makes disabling edits (a single edit collapses the outputs)"),
                                ("r-rome", "r-ROME makes no disabling edits")):
            if method not in by_method:
                continue
            row, count = by_method[method], len(by_method[method]["disabling"])
            if method == "rome":
                verdict = REPRODUCED if count else NOT_REPRODUCED
            else:
                verdict = NOT_REPRODUCED if count else (REPRODUCED if rome else INCONCLUSIVE)
            evidence = f"{count} of {row['n_edits']} sequential single edits halved the probe agreement"
            if count:
                listed = ", ".join(map(str, row["disabling"][:10])) + (", ..." if count > 10 else "")
                evidence += f" (at edits {listed})"
            norm = NORM_NAMES[row["norm"]]
            if count:
                evidence += (f"; the first: agreement {row['first_before']:.2f} -> {row['first_after']:.2f}, {norm} "
                             f"{row['first_norm']:.3g} of the unedited layer's")
            evidence += (f"; {norm} per edit: median {row['median_norm']:.3g}, largest {row['largest_norm']:.3g} "
                         f"(edit {row['largest_at']}); update norms above {SPIKE:g}x the running median: "
                         f"{len(row['norm_spikes'])}")
            rows.append({"study": "Gupta et al. 2024 (Rebuilding ROME)", "finding": finding, "model": model,
                         "method": method, "evidence": evidence, "verdict": verdict})
    return rows


def collapse_with_batch_size(downstream: pd.DataFrame, steps: pd.DataFrame | None) -> list[dict]:
    """Lin et al.'s batch-size ablation at the collapse point: at an equal number of edits, bigger
    batches collapse later. Per probed method run at several batch sizes, the smallest and largest
    batch's collapse intervals (collapse_points): reproduced when the larger batch's lies wholly after
    the smaller's (or only the smaller collapses), not reproduced when wholly before (or only the
    larger collapses), inconclusive when they overlap or neither collapses."""
    probed = _probed(steps)
    if probed.empty:
        return []
    points = collapse_points(downstream)
    if points.empty:
        return []
    points = points[points["method"].isin(set(probed["method"]))]
    rows = []
    for (model, method), part in points.groupby(["model", "method"], sort=False):
        if part["batch_size"].nunique() < 2:
            continue
        part = part.sort_values("batch_size")
        small, large = part.iloc[0], part.iloc[-1]
        s_collapsed, l_collapsed = not math.isnan(small["collapse_at"]), not math.isnan(large["collapse_at"])
        if s_collapsed and l_collapsed:
            verdict = (REPRODUCED if large["collapse_after"] >= small["collapse_at"] else
                       NOT_REPRODUCED if large["collapse_at"] <= small["collapse_after"] else INCONCLUSIVE)
        else:
            verdict = (REPRODUCED if s_collapsed else NOT_REPRODUCED if l_collapsed else INCONCLUSIVE)

        def where(point):
            if math.isnan(point["collapse_at"]):
                return f"b={point['batch_size']}: no collapse through {int(point['last'])} edits"
            return (f"b={point['batch_size']}: collapse between {int(point['collapse_after'])} and "
                    f"{int(point['collapse_at'])} edits")

        rows.append({"study": "Lin et al. 2024", "finding": "bigger batches collapse later (equal edits)",
                     "model": model, "method": method, "evidence": f"{where(small)}; {where(large)}",
                     "verdict": verdict})
    return rows


CHECKS: dict[str, Callable[..., list[dict]]] = {
    "tracing": lambda t: tracing_matches_sweep(t["traces"], t["layer_sweep"]),
    "batch_size": lambda t: ns_falls_with_batch_size(t["edits"]),
    "sequential": lambda t: sequential_beats_one_batch(t["edits"]),
    "downstream": lambda t: downstream_erosion(t["downstream"]),
    "perplexity": lambda t: perplexity_erosion(t["downstream"]),
    "batch_ablation": lambda t: bigger_batches_erode_less(t["downstream"]),
    "projection": lambda t: projection_erodes_less(t["downstream"]),
    "grace": lambda t: grace_generalises_poorly(t["edits"]),
    "forgetting": lambda t: gradual_then_catastrophic(t["downstream"], t.get("steps")),
    "disabling": lambda t: disabling_edits(t.get("steps")),
    "collapse_batch": lambda t: collapse_with_batch_size(t["downstream"], t.get("steps")),
}


def assess(tables: dict[str, pd.DataFrame], ablation_tables: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """Every finding that the tables (edits, layer_sweep, downstream, traces) can test, model by
    model, and those of the ablations' tables (editlib.study.ablations.ablation_tables)."""
    models = list(dict.fromkeys(m for frame in tables.values() if "model" in frame.columns for m in frame["model"]))
    rows = []
    for model in models:
        own = {name: frame[frame["model"] == model] if "model" in frame.columns else frame
               for name, frame in tables.items()}
        rows += [{**row, "model": model} for check in CHECKS.values() for row in check(own)]
    rows += ablation_findings(ablation_tables or {})
    return pd.DataFrame(rows, columns=FINDING_COLUMNS)


def write_findings_html(findings: pd.DataFrame, path, title: str = "") -> None:
    """A small self-contained HTML table of the findings, for the Snakemake report."""
    colours = {REPRODUCED: "#d9f2d9", NOT_REPRODUCED: "#f8d7d7", INCONCLUSIVE: "#fff3cd"}
    body = "".join(
        f"<tr style='background:{colours.get(r.verdict, '#fff')}'>"
        + "".join(f"<td>{html.escape(str(getattr(r, c)))}</td>" for c in FINDING_COLUMNS) + "</tr>"
        for r in findings.itertuples())
    head = "".join(f"<th>{c}</th>" for c in FINDING_COLUMNS)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Findings {html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
            "td,th{border:1px solid #bbb;padding:4px 6px;vertical-align:top;text-align:left}</style></head><body>"
            f"<h2>What this run reproduced ({html.escape(title)})</h2>"
            "<p>Verdicts compare 95% intervals: bootstrap over facts for edit metrics; for downstream accuracies "
            "+-1.96 standard errors, or Student's t over the edit samples where their spread is the larger "
            "error; overlapping intervals are inconclusive.</p>"
            f"<table><tr>{head}</tr>{body}</table></body></html>")
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
