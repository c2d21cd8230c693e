"""The papers' findings checked against a run's tidy tables, each with its numbers and a verdict.

Every check compares estimates with their 95% intervals (bootstrap over facts for edit metrics,
+-1.96 lm-eval standard errors for downstream accuracies) and says "reproduced" only when the
difference the paper reports is larger than the intervals: overlapping intervals give
"inconclusive", a difference the other way "not reproduced". A finding whose experiment is not
in the run is left out.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable

import pandas as pd

from editlib.io import atomic_path
from editlib.study.ablations import KINDS, sample_table
from editlib.study.tables import (
    accuracy_difference,
    average_effects,
    edits_over_samples,
    over_samples,
    peak_layer,
    primary_metric,
)

FINDING_COLUMNS = ["study", "finding", "model", "method", "evidence", "verdict"]
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
KEEP_MARGIN = 0.05  # largest accuracy drop (mean over tasks) an interval may allow for abilities to count as kept


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


def downstream_erosion(downstream: pd.DataFrame, preserving: tuple[str, ...] = ("grace",)) -> list[dict]:
    """Lin et al.: parameter-modifying editors erode general abilities under sequential editing,
    the parameter-preserving GRACE does not. Per method and batch size, mean accuracy over tasks
    before editing vs after the last checkpoint; the difference's interval is +-1.96 SE."""
    if downstream.empty:
        return []
    data = downstream[downstream["experiment"] == "sequential"]
    if data.empty:
        return []
    per_sample = primary_metric(data)
    data = over_samples(per_sample)
    rows = []
    for (method, batch), part in data.groupby(["method", "batch_size"], sort=False):
        last = part["n_edits"].max()
        before, after = part[part["n_edits"] == 0], part[part["n_edits"] == last]
        if before.empty or last == 0:
            continue
        merged, gain, gain_lo, gain_hi = accuracy_difference(before, after)
        drop, lo, hi = 0.0 - gain, 0.0 - gain_hi, 0.0 - gain_lo  # 0.0 - x: no negative zero
        if method in preserving:  # no detectable drop, and the interval rules out one of KEEP_MARGIN
            verdict = NOT_REPRODUCED if lo > 0 else (REPRODUCED if hi < KEEP_MARGIN else INCONCLUSIVE)
            finding = "the parameter-preserving editor keeps general abilities (no drop beyond its interval)"
        else:
            verdict = _positive_verdict(lo, hi)
            finding = "sequential edits erode general abilities"
        tasks = ", ".join(f"{r['task']} {r['value_a']:.2f}->{r['value_b']:.2f}" for _, r in merged.iterrows())
        evidence = f"mean accuracy drop after {int(last)} edits (b={int(batch)}): {drop:+.3f} [{lo:+.3f}, {hi:+.3f}] ({tasks})"
        n_samples = int(part["n_samples"].max())
        if n_samples > 1:
            drops = sample_table(per_sample[(per_sample["method"] == method) & (per_sample["batch_size"] == batch)])
            evidence += f"; mean of {n_samples} disjoint edit samples, whose drops are " + ", ".join(
                f"{drop:+.3f}" for drop in drops["drop"])
        rows.append({"study": "Lin et al. 2024", "finding": finding, "method": f"{method} b={int(batch)}",
                     "evidence": evidence, "verdict": verdict})
    return rows


def bigger_batches_erode_less(downstream: pd.DataFrame) -> list[dict]:
    """Lin et al. (ablation): at an equal number of sequential edits, bigger batches erode general
    abilities less. Per method run at several batch sizes: mean accuracy over tasks after the last
    checkpoint with the largest batch minus with the smallest; both runs start from the same
    unedited model, so the difference's interval is +-1.96 SE of the two final accuracies."""
    if downstream.empty:
        return []
    data = over_samples(primary_metric(downstream[downstream["experiment"] == "sequential"]))
    rows = []
    for method, part in data.groupby("method", sort=False):
        last = part["n_edits"].max()
        final = part[part["n_edits"] == last]
        sizes = sorted(final["batch_size"].unique())
        if last == 0 or len(sizes) < 2:
            continue
        small, large = final[final["batch_size"] == sizes[0]], final[final["batch_size"] == sizes[-1]]
        _, gain, lo, hi = accuracy_difference(small, large)
        means = final.groupby("batch_size")["value"].mean()
        listing = ", ".join(f"b={int(b)}: {v:.3f}" for b, v in means.items())
        evidence = (f"mean accuracy after {int(last)} edits, b={int(sizes[-1])} minus b={int(sizes[0])}: "
                    f"{gain:+.3f} [{lo:+.3f}, {hi:+.3f}] ({listing})")
        rows.append({"study": "Lin et al. 2024", "finding": "bigger batches erode general abilities less (equal edits)",
                     "method": method, "evidence": evidence, "verdict": _positive_verdict(lo, hi)})
    return rows


def ablation_findings(tables: dict[str, pd.DataFrame]) -> list[dict]:
    """Lin et al.'s ablations (editlib.study.ablations): for each compared pair, the arm that should
    erode less ("deep", "with", "larger", "chat") against the other, by the mean over tasks of
    the accuracy lost after the last common checkpoint, +-1.96 SE. Arms on one model share the
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
                _, drop_a, lo_a, _ = accuracy_difference(a_last, a_base)
                _, drop_b, lo_b, _ = accuracy_difference(b_last, b_base)
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


CHECKS: dict[str, Callable[..., list[dict]]] = {
    "tracing": lambda t: tracing_matches_sweep(t["traces"], t["layer_sweep"]),
    "batch_size": lambda t: ns_falls_with_batch_size(t["edits"]),
    "sequential": lambda t: sequential_beats_one_batch(t["edits"]),
    "downstream": lambda t: downstream_erosion(t["downstream"]),
    "batch_ablation": lambda t: bigger_batches_erode_less(t["downstream"]),
    "grace": lambda t: grace_generalises_poorly(t["edits"]),
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
            "<p>Verdicts compare 95% intervals: bootstrap over facts for edit metrics, +-1.96 standard errors for "
            "downstream accuracies; overlapping intervals are inconclusive.</p>"
            f"<table><tr>{head}</tr>{body}</table></body></html>")
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
