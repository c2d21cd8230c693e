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

from .io import atomic_path

FINDING_COLUMNS = ["study", "finding", "method", "evidence", "verdict"]
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
Z95 = 1.959964
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
    effects = traces[(traces["kind"] == "mlp") & (traces["token"] == "subject_last")]
    means = effects.groupby("layer")["effect"].mean()
    peak = int(means.idxmax())
    rows = []
    for method, part in sweep.groupby("method", sort=False):
        part = part.assign(layer=part["layers"].astype(int)).sort_values("layer")
        best = part.loc[part[criterion].idxmax()]
        agree = abs(int(best["layer"]) - peak) <= 1
        evidence = (f"tracing: subject-last MLP effect peaks at layer {peak} (AIE {means.max():.3f} over "
                    f"{effects['case_id'].nunique()} facts); sweep: best {criterion} at layer {int(best['layer'])} "
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
    data = edits[(edits["experiment"] == "sequential") & (edits["scope"] == "edited_so_far")]
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


def primary_metric(downstream: pd.DataFrame) -> pd.DataFrame:
    """One metric per task: acc where the task reports it (acc_norm is then skipped), else its first."""
    keep = [group[group["metric"] == ("acc" if "acc" in set(group["metric"]) else group["metric"].iloc[0])]
            for _, group in downstream.groupby("task")]
    return pd.concat(keep, ignore_index=True) if keep else downstream


def _accuracy_difference(first: pd.DataFrame, second: pd.DataFrame):
    """(per-task merge, value_a from `first` and value_b from `second`; the mean over tasks of
    second's minus first's accuracy; its 95% interval from the two sides' lm-eval standard errors)."""
    merged = first.merge(second, on="task", suffixes=("_a", "_b"))
    diff = float((merged["value_b"] - merged["value_a"]).mean())
    se = math.sqrt(float((merged["stderr_a"].fillna(0) ** 2 + merged["stderr_b"].fillna(0) ** 2).sum())) / len(merged)
    return merged, diff, diff - Z95 * se, diff + Z95 * se


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
    data = primary_metric(data)
    rows = []
    for (method, batch), part in data.groupby(["method", "batch_size"], sort=False):
        last = part["n_edits"].max()
        before, after = part[part["n_edits"] == 0], part[part["n_edits"] == last]
        if before.empty or last == 0:
            continue
        merged, gain, gain_lo, gain_hi = _accuracy_difference(before, after)
        drop, lo, hi = 0.0 - gain, 0.0 - gain_hi, 0.0 - gain_lo  # 0.0 - x: no negative zero
        if method in preserving:  # no detectable drop, and the interval rules out one of KEEP_MARGIN
            verdict = NOT_REPRODUCED if lo > 0 else (REPRODUCED if hi < KEEP_MARGIN else INCONCLUSIVE)
            finding = "the parameter-preserving editor keeps general abilities (no drop beyond its interval)"
        else:
            verdict = _positive_verdict(lo, hi)
            finding = "sequential edits erode general abilities"
        tasks = ", ".join(f"{r['task']} {r['value_a']:.2f}->{r['value_b']:.2f}" for _, r in merged.iterrows())
        evidence = f"mean accuracy drop after {int(last)} edits (b={int(batch)}): {drop:+.3f} [{lo:+.3f}, {hi:+.3f}] ({tasks})"
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
    data = primary_metric(downstream[downstream["experiment"] == "sequential"])
    rows = []
    for method, part in data.groupby("method", sort=False):
        last = part["n_edits"].max()
        final = part[part["n_edits"] == last]
        sizes = sorted(final["batch_size"].unique())
        if last == 0 or len(sizes) < 2:
            continue
        small, large = final[final["batch_size"] == sizes[0]], final[final["batch_size"] == sizes[-1]]
        _, gain, lo, hi = _accuracy_difference(small, large)
        means = final.groupby("batch_size")["value"].mean()
        listing = ", ".join(f"b={int(b)}: {v:.3f}" for b, v in means.items())
        evidence = (f"mean accuracy after {int(last)} edits, b={int(sizes[-1])} minus b={int(sizes[0])}: "
                    f"{gain:+.3f} [{lo:+.3f}, {hi:+.3f}] ({listing})")
        rows.append({"study": "Lin et al. 2024", "finding": "bigger batches erode general abilities less (equal edits)",
                     "method": method, "evidence": evidence, "verdict": _positive_verdict(lo, hi)})
    return rows


def _final_accuracy_difference(part: pd.DataFrame, first: str, second: str):
    """(last n_edits, batch size, mean over tasks of second's minus first's final accuracy, its
    +-1.96 SE interval) for two methods run sequentially at a common batch size; None if none."""
    a, b = part[part["method"] == first], part[part["method"] == second]
    common = sorted(set(a["batch_size"]) & set(b["batch_size"]))
    if not common:
        return None
    batch = common[0]
    a, b = a[a["batch_size"] == batch], b[b["batch_size"] == batch]
    last = min(a["n_edits"].max(), b["n_edits"].max())
    if last == 0:
        return None
    _, diff, lo, hi = _accuracy_difference(a[a["n_edits"] == last], b[b["n_edits"] == last])
    return int(last), int(batch), diff, lo, hi


def deeper_layers_erode_less(downstream: pd.DataFrame, pairs) -> list[dict]:
    """Lin et al. (ablation): editing deeper layers erodes general abilities less. For each
    configured pair (`ablations.edited_layers`: the same method at a shallow and a deep layer),
    the deep run's final downstream accuracy minus the shallow run's, +-1.96 SE."""
    if downstream.empty or not pairs:
        return []
    data = primary_metric(downstream[downstream["experiment"] == "sequential"])
    rows = []
    for pair in pairs:
        result = _final_accuracy_difference(data, pair["shallow"], pair["deep"])
        if result is None:
            continue
        last, batch, diff, lo, hi = result
        evidence = (f"mean accuracy after {last} edits (b={batch}), {pair['deep']} minus {pair['shallow']}: "
                    f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        rows.append({"study": "Lin et al. 2024", "finding": "deeper edited layers erode general abilities less",
                     "method": f"{pair['deep']} vs {pair['shallow']}", "evidence": evidence,
                     "verdict": _positive_verdict(lo, hi)})
    return rows


def grace_generalises_poorly(edits: pd.DataFrame) -> list[dict]:
    """Lin et al.: GRACE makes its edits (high ES) but generalises poorly to rephrasings (low PS)."""
    if edits.empty:
        return []
    data = edits[(edits["method"] == "grace") & (edits["scope"] == "edited_so_far")]
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


def assess(tables: dict[str, pd.DataFrame], ablations: dict | None = None) -> pd.DataFrame:
    """Every finding that the tables (edits, layer_sweep, downstream, traces) can test, and
    those of the configured `ablations` (edited_layers pairs)."""
    rows = [row for check in CHECKS.values() for row in check(tables)]
    rows += deeper_layers_erode_less(tables["downstream"], (ablations or {}).get("edited_layers", []))
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
