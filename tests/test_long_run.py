"""The long run's findings (collapse point, disabling edits, collapse against batch size) and figure,
on tables built by hand."""

import math

import pandas as pd
import pytest

from editlib.study.findings import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    assess,
    collapse_points,
    collapse_with_batch_size,
    disabling_edit_counts,
    disabling_edits,
    gradual_then_catastrophic,
)
from editlib.study.plotting import forgetting_figure
from editlib.study.tables import STEP_COLUMNS, mean_accuracy_curve


def _downstream(curves: dict, model: str = "toy") -> pd.DataFrame:
    """(method, batch_size) -> {n_edits: mean accuracy}: two tasks at value +- 0.05 around it."""
    rows = []
    for (method, batch), curve in curves.items():
        for n, value in curve.items():
            for task, offset in (("a", 0.05), ("b", -0.05)):
                rows.append({"experiment": "sequential", "model": model, "method": method, "batch_size": batch,
                             "sample": 0, "n_edits": n, "task": task, "metric": "acc", "value": value + offset,
                             "stderr": 0.02, "n_items": 200, "error": ""})
    return pd.DataFrame(rows)


def _steps(runs: dict, model: str = "toy") -> pd.DataFrame:
    """(method, batch_size) -> agreement after each batch (None: no probe)."""
    rows = []
    for (method, batch), agreements in runs.items():
        for step, agreement in enumerate(agreements, start=1):
            rows.append({"experiment": "sequential", "model": model, "method": method, "layers": "0",
                         "batch_size": batch, "sample": 0, "n_edits": step * batch, "step": step,
                         "relative_update_norm": 0.01 * step, "relative_output_change": 0.001 * step,
                         "top_token_share": 0.1,
                         "agreement": math.nan if agreement is None else agreement})
    return pd.DataFrame(rows, columns=STEP_COLUMNS)


GRADUAL_THEN_SUDDEN = {0: 0.8, 1: 0.8, 16: 0.75, 64: 0.7, 128: 0.3, 256: 0.1}   # 80% kept to 64, below half at 128
SLOW = {0: 0.8, 1: 0.7, 16: 0.6, 64: 0.5, 128: 0.45, 256: 0.38}                # below half only at 256, 80% lost at 1
NEVER = {0: 0.8, 1: 0.8, 16: 0.78, 64: 0.75, 128: 0.7, 256: 0.66}


def test_the_mean_accuracy_curve_averages_tasks_and_their_errors():
    curve = mean_accuracy_curve(_downstream({("memit", 1): {0: 0.8, 4: 0.6}}))
    assert curve["value"].tolist() == pytest.approx([0.8, 0.6])
    assert curve["stderr"].tolist() == pytest.approx([math.sqrt(2 * 0.02 ** 2) / 2] * 2)
    assert curve["n_tasks"].tolist() == [2, 2]


def test_collapse_points_bracket_the_first_count_below_half():
    points = collapse_points(_downstream({("memit", 1): GRADUAL_THEN_SUDDEN, ("rome", 1): NEVER}))
    memit, rome = points.iloc[0], points.iloc[1]
    assert (memit["collapse_after"], memit["collapse_at"], memit["gradual_until"]) == (64, 128, 64)
    assert math.isnan(rome["collapse_at"]) and rome["gradual_until"] == 256 and rome["lowest_at"] == 256


def test_gradual_then_catastrophic_needs_a_kept_phase_and_a_fall_within_a_doubling():
    curves = {("memit", 1): GRADUAL_THEN_SUDDEN, ("emmet", 1): SLOW, ("rome", 1): NEVER}
    steps = _steps({key: [0.99, 0.98] for key in curves})
    verdicts = {row["method"]: row["verdict"] for row in gradual_then_catastrophic(_downstream(curves), steps)}
    assert verdicts == {"memit b=1": REPRODUCED, "emmet b=1": NOT_REPRODUCED, "rome b=1": NOT_REPRODUCED}
    [memit] = [row for row in gradual_then_catastrophic(_downstream(curves), steps) if row["method"] == "memit b=1"]
    assert "between 64 and 128 edits" in memit["evidence"]
    # a run without the probe (the default's sequential runs) is not a long run: no finding
    assert gradual_then_catastrophic(_downstream(curves), _steps({key: [None] for key in curves})) == []


def test_disabling_edits_halve_the_agreement_in_one_edit_of_a_working_model():
    steps = _steps({("rome", 1): [0.99, 0.97, 0.40, 0.39, 0.15, 0.05],   # edit 3 disables; 5 halves a broken model
                    ("r-rome", 1): [0.99, 0.98, 0.97, 0.96, 0.95, 0.94],
                    ("memit", 64): [0.9, 0.1]})                          # batches are not single edits
    counts = disabling_edit_counts(steps).set_index("method")
    assert counts.loc["rome", "disabling"] == [3] and counts.loc["r-rome", "disabling"] == []
    assert "memit" not in counts.index
    assert counts.loc["rome", "first_before"] == 0.97 and counts.loc["rome", "first_after"] == 0.40
    assert counts.loc["rome", "norm"] == "relative_output_change"
    assert counts.loc["rome", "norm_spikes"] == []  # norms 0.01, 0.02, ...: growing, never 10x the median
    assert counts.loc["rome", "first_norm"] == pytest.approx(0.003) and counts.loc["rome", "largest_at"] == 6
    verdicts = {row["method"]: row["verdict"] for row in disabling_edits(steps)}
    assert verdicts == {"rome": REPRODUCED, "r-rome": REPRODUCED}
    flat = _steps({("rome", 1): [0.99, 0.98], ("r-rome", 1): [0.99, 0.98]})
    assert {row["method"]: row["verdict"] for row in disabling_edits(flat)} == {"rome": NOT_REPRODUCED,
                                                                                 "r-rome": INCONCLUSIVE}
    both = _steps({("rome", 1): [0.99, 0.3], ("r-rome", 1): [0.99, 0.2]})
    assert {row["method"]: row["verdict"] for row in disabling_edits(both)} == {"rome": REPRODUCED,
                                                                                 "r-rome": NOT_REPRODUCED}


def test_norm_spikes_are_ten_times_the_running_median():
    steps = _steps({("rome", 1): [0.99] * 6})
    steps["relative_update_norm"] = [1.0, 1.2, 0.9, 11.0, 1.1, 10.5]  # medians before: -, 1, 1.1, 1, 1.1, 1.1
    assert disabling_edit_counts(steps).loc[0, "norm_spikes"] == [4]  # 11 > 10 x 1.0; 10.5 < 10 x 1.1
    assert "above 10x the running median: 1" in disabling_edits(steps)[0]["evidence"]


def test_collapse_against_batch_size_compares_the_brackets():
    later = {0: 0.8, 64: 0.78, 128: 0.75, 192: 0.7, 256: 0.3}
    curves = {("memit", 1): GRADUAL_THEN_SUDDEN, ("memit", 64): later,        # (64, 128] vs (192, 256]: later
              ("emmet", 1): later, ("emmet", 64): GRADUAL_THEN_SUDDEN,        # earlier
              ("alphaedit", 1): NEVER, ("alphaedit", 64): NEVER}              # neither collapses
    steps = _steps({key: [0.9] for key in curves})
    verdicts = {row["method"]: row["verdict"] for row in collapse_with_batch_size(_downstream(curves), steps)}
    assert verdicts == {"memit": REPRODUCED, "emmet": NOT_REPRODUCED, "alphaedit": INCONCLUSIVE}


def test_assess_adds_the_long_run_findings_only_with_the_probe():
    curves = {("rome", 1): GRADUAL_THEN_SUDDEN, ("r-rome", 1): GRADUAL_THEN_SUDDEN}
    tables = {name: pd.DataFrame() for name in ("edits", "layer_sweep", "traces")}
    tables["downstream"] = _downstream(curves)
    with_probe = assess({**tables, "steps": _steps({key: [0.99, 0.3] for key in curves})})
    assert set(with_probe["study"]) == {"Gupta, Rao, Anumanchipalli 2024", "Gupta et al. 2024 (Rebuilding ROME)",
                                        "Lin et al. 2024"}  # Lin et al.: the erosion findings of the same runs
    without = assess({**tables, "steps": _steps({key: [None, None] for key in curves})})
    assert not without["study"].str.startswith("Gupta").any()


def test_the_forgetting_figure_draws_every_run(tmp_path):
    curves = {("memit", 1): GRADUAL_THEN_SUDDEN, ("memit", 64): NEVER}
    edits = pd.DataFrame([{"experiment": "sequential", "model": "toy", "method": "memit", "layers": "0",
                           "batch_size": b, "sample": 0, "n_edits": n, "step": n // b, "scope": "edited_so_far",
                           "S": 90.0, "S_lo": 85.0, "S_hi": 95.0} for b in (1, 64) for n in (64, 128)])
    path = tmp_path / "forgetting.png"
    forgetting_figure(edits, _downstream(curves), _steps({key: [0.9, 0.8] for key in curves}), path, "t")
    assert path.stat().st_size > 10_000
    empty = tmp_path / "none.png"
    forgetting_figure(edits, _downstream(curves), _steps({key: [None] for key in curves}), empty, "t")
    assert empty.stat().st_size < path.stat().st_size
