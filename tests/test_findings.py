"""The findings checks: verdicts follow the intervals in the tables, computed by hand here."""

import math

import numpy as np
import pandas as pd
import pytest

from editlib.study.ablations import ablation_tables, sample_table
from editlib.study.findings import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    ablation_findings,
    assess,
    bigger_batches_erode_less,
    downstream_erosion,
    ns_falls_with_batch_size,
    perplexity_erosion,
    projection_erodes_less,
    sequential_beats_one_batch,
    tracing_matches_sweep,
)
from editlib.study.tables import mean_accuracy_curve, over_samples


def _row(**values):
    """An edits-table row with intervals value +- 1 for every metric not given with its own."""
    row = {"experiment": "batched", "method": "memit", "layers": "0", "batch_size": 1, "n_edits": 1, "scope": "batch"}
    for metric in ("ES", "PS", "NS", "S"):
        value = values.pop(metric, 50.0)
        row.update({metric: value, f"{metric}_lo": value - 1, f"{metric}_hi": value + 1})
    row.update(values)
    return row


def test_ns_falls_verdicts_follow_interval_overlap():
    edits = pd.DataFrame([_row(batch_size=1, NS=90.0), _row(batch_size=16, NS=85.0), _row(batch_size=256, NS=80.0),
                          _row(method="emmet", batch_size=1, NS=80.5), _row(method="emmet", batch_size=256, NS=80.0),
                          _row(method="alphaedit", batch_size=1, NS=70.0), _row(method="alphaedit", batch_size=256, NS=80.0)])
    verdicts = {row["method"]: row["verdict"] for row in ns_falls_with_batch_size(edits)}
    assert verdicts == {"memit": REPRODUCED, "emmet": INCONCLUSIVE, "alphaedit": NOT_REPRODUCED}


def test_sequential_against_one_batch_compares_the_best_smaller_batch():
    base = {"experiment": "sequential", "scope": "edited_so_far", "n_edits": 64}
    edits = pd.DataFrame([_row(**base, batch_size=1, S=70.0), _row(**base, batch_size=8, S=75.0),
                          _row(**base, batch_size=64, S=72.0),
                          _row(**{**base, "n_edits": 8}, batch_size=1, S=99.0)])  # earlier checkpoint: ignored
    [row] = sequential_beats_one_batch(edits)
    assert row["verdict"] == REPRODUCED and "b=8 75.0" in row["evidence"]
    edits.loc[edits["batch_size"] == 64, ["S", "S_lo", "S_hi"]] = [74.5, 73.5, 75.5]
    assert sequential_beats_one_batch(edits)[0]["verdict"] == INCONCLUSIVE


def test_downstream_erosion_uses_the_standard_errors():
    rows = []
    for method, after in (("memit", 0.5), ("grace", 0.89), ("rome", 0.885), ("grace_eroding", 0.87)):
        for task in ("a", "b"):
            rows.append({"experiment": "sequential", "method": method, "batch_size": 1, "n_edits": 0, "task": task,
                         "metric": "acc", "value": 0.9, "stderr": 0.01})
            rows.append({"experiment": "sequential", "method": method, "batch_size": 1, "n_edits": 32, "task": task,
                         "metric": "acc", "value": after, "stderr": 0.01})
    verdicts = {row["method"]: row for row in downstream_erosion(pd.DataFrame(rows), preserving=("grace", "grace_eroding"))}
    # drop 0.4 +- 1.96 * sqrt(4 * 0.01^2) / 2 = 0.4 +- 0.0196
    assert verdicts["memit b=1"]["verdict"] == REPRODUCED and "+0.400 [+0.380, +0.420]" in verdicts["memit b=1"]["evidence"]
    assert verdicts["grace b=1"]["verdict"] == REPRODUCED  # drop 0.01 [-0.01, 0.03]: none detectable, < 0.05
    assert verdicts["grace_eroding b=1"]["verdict"] == NOT_REPRODUCED  # drop 0.03 [0.01, 0.05]: it erodes
    assert verdicts["rome b=1"]["verdict"] == INCONCLUSIVE  # drop 0.015 +- 0.0196 reaches below 0


def test_item_paired_errors_replace_the_independent_ones_against_the_unedited_model():
    """Rows carrying change_stderr (the downstream jobs pair each state with the unedited model
    question by question) take their interval from it: a GRACE run that changed no answer (a
    paired error near 0) keeps abilities, where the independent errors left it inconclusive; a row without one
    puts the whole run back on the independent errors."""
    rows = []
    for method, after, change_stderr in (("memit", 0.88, 0.004), ("grace", 0.9, 0.0)):
        for task in ("a", "b"):
            for n_edits, value, stderr in ((0, 0.9, 0.0), (32, after, change_stderr)):
                rows.append({"experiment": "sequential", "method": method, "batch_size": 1, "n_edits": n_edits,
                             "task": task, "metric": "acc", "value": value, "stderr": 0.03, "change_stderr": stderr})
    downstream = pd.DataFrame(rows)
    verdicts = {row["method"]: row for row in downstream_erosion(downstream)}
    # paired: drop 0.02 +- 1.96 * sqrt(2 * 0.004^2) / 2 = 0.02 +- 0.0055; independent: +- 0.0588
    assert verdicts["memit b=1"]["verdict"] == REPRODUCED and "+0.020 [+0.014, +0.026]" in verdicts["memit b=1"]["evidence"]
    assert verdicts["grace b=1"]["verdict"] == REPRODUCED and "+0.000 [+0.000, +0.000]" in verdicts["grace b=1"]["evidence"]
    assert all(row["evidence"].endswith("; interval paired question by question") for row in verdicts.values())
    drops = sample_table(downstream.assign(model="toy")).set_index("method")  # the ablation figures' per-sample drops
    assert drops.loc["memit", "drop_hi"] - drops.loc["memit", "drop"] == pytest.approx(1.959964 * math.sqrt(2) * 0.004 / 2)
    downstream.loc[(downstream["method"] == "memit") & (downstream["task"] == "b") & (downstream["n_edits"] == 32),
                   "change_stderr"] = None
    memit = {row["method"]: row for row in downstream_erosion(downstream)}["memit b=1"]
    assert memit["verdict"] == INCONCLUSIVE and "+0.020 [-0.039, +0.079]" in memit["evidence"]
    assert "paired" not in memit["evidence"]
    # two edited runs are never paired through their changes from the unedited model
    [bigger] = bigger_batches_erode_less(pd.concat([downstream, downstream[downstream["method"] == "grace"].assign(
        method="memit", batch_size=8)]))
    assert "+0.020 [-0.039, +0.079]" in bigger["evidence"]  # +- 1.96 * hypot of the means' sqrt(2 * 0.03^2) / 2


def _with_perplexity_task(accuracy_after: float, perplexity_after: dict) -> pd.DataFrame:
    """One accuracy task (0.9 -> accuracy_after) and a wikitext-like task (word perplexity 20 -> the
    method's value, standard error 1% of it; byte perplexity and bits per byte beside it), all as
    the downstream job writes them, lm-eval's metric directions included."""
    rows = []
    for method, after in perplexity_after.items():
        for n_edits, ppl, acc in ((0, 20.0, 0.9), (32, after, accuracy_after)):
            base = {"experiment": "sequential", "model": "toy", "method": method, "batch_size": 1, "sample": 0,
                    "n_edits": n_edits}
            rows.append({**base, "task": "facts", "metric": "acc", "higher_is_better": True, "value": acc, "stderr": 0.01})
            rows.append({**base, "task": "facts", "metric": "acc_norm", "higher_is_better": True, "value": acc, "stderr": 0.01})
            for metric, value in (("word_perplexity", ppl), ("byte_perplexity", ppl ** 0.2), ("bits_per_byte", 0.5)):
                rows.append({**base, "task": "wiki", "metric": metric, "higher_is_better": False, "value": value,
                             "stderr": 0.01 * value})
    return pd.DataFrame(rows)


def test_a_perplexity_task_never_enters_a_mean_accuracy():
    """Perplexity is lower-is-better and not an accuracy: the erosion findings and the curves average
    the accuracy task alone, whatever the perplexity does."""
    downstream = _with_perplexity_task(0.5, {"memit": 40.0})
    [row] = downstream_erosion(downstream)
    assert "+0.400 [" in row["evidence"] and "wiki" not in row["evidence"]
    curve = mean_accuracy_curve(downstream)
    assert curve["value"].tolist() == [0.9, 0.5] and set(curve["n_tasks"]) == {1}


def test_a_perplexity_without_its_direction_is_still_no_accuracy():
    """Rows without lm-eval's direction (an older table, or one job's rows without the column):
    the metric's name, or its direction on the task's other rows, marks it lower-is-better."""
    downstream = _with_perplexity_task(0.5, {"memit": 40.0})
    unedited = downstream["n_edits"] == 0
    for older in (downstream.drop(columns="higher_is_better"), downstream.assign(
            higher_is_better=downstream["higher_is_better"].where(~unedited, None))):
        [row] = downstream_erosion(older)
        assert "+0.400 [" in row["evidence"] and "wiki" not in row["evidence"]
        [rise] = perplexity_erosion(older)
        assert "20.00 -> 40.00" in rise["evidence"]


def test_perplexity_erosion_is_a_relative_rise_with_its_interval():
    downstream = _with_perplexity_task(0.9, {"memit": 30.0, "grace": 20.2, "rome": 20.3, "grace_eroding": 22.0})
    rows = {row["method"]: row for row in perplexity_erosion(downstream, preserving=("grace", "grace_eroding"))}
    # log rise log(1.5) +- 1.96 * hypot(0.01, 0.01) = 0.405 +- 0.028
    half = 1.959964 * math.hypot(0.01, 0.01)
    lo, hi = math.expm1(math.log(1.5) - half), math.expm1(math.log(1.5) + half)
    assert rows["memit b=1"]["verdict"] == REPRODUCED
    assert f"20.00 -> 30.00, +50.0% [{lo:+.1%}, {hi:+.1%}]" in rows["memit b=1"]["evidence"]
    assert "word_perplexity on wiki" in rows["memit b=1"]["evidence"]
    assert rows["rome b=1"]["verdict"] == INCONCLUSIVE  # +1.5% [-1.2%, +4.3%] reaches below 0
    assert rows["grace b=1"]["verdict"] == REPRODUCED  # +1.0% [-1.7%, +3.8%]: none detectable, < 5%
    assert rows["grace_eroding b=1"]["verdict"] == NOT_REPRODUCED  # +10%, its interval above 0
    # item-paired: change_stderr is the error of the change of log word perplexity; byte perplexity's
    # is on the same scale, bits per byte's (in its own units) is never read as a log's
    edited = downstream["n_edits"] == 32
    paired = downstream.assign(change_stderr=np.where(edited, 0.002, 0.0))
    paired.loc[edited & (paired["metric"] == "bits_per_byte"), "change_stderr"] = 9.0
    rows = {row["method"]: row for row in perplexity_erosion(paired, preserving=("grace", "grace_eroding"))}
    rome_lo, rome_hi = math.expm1(math.log(20.3 / 20) - 1.959964 * 0.002), math.expm1(math.log(20.3 / 20) + 1.959964 * 0.002)
    assert f"+1.5% [{rome_lo:+.1%}, {rome_hi:+.1%}]" in rows["rome b=1"]["evidence"]
    assert rows["rome b=1"]["verdict"] == REPRODUCED  # the paired interval clears 0
    assert rows["rome b=1"]["evidence"].endswith("; interval paired text by text")


def test_bigger_batches_compare_final_accuracies_of_the_extreme_batch_sizes():
    rows = []
    finals = {("memit", 1): 0.70, ("memit", 4): 0.60, ("memit", 16): 0.80,  # b=16 vs b=1: +0.10
              ("emmet", 1): 0.80, ("emmet", 16): 0.79, ("rome", 1): 0.5}     # -0.01: inconclusive; one size: left out
    for (method, batch), after in finals.items():
        for task in ("a", "b"):
            rows.append({"experiment": "sequential", "method": method, "batch_size": batch, "n_edits": 0, "task": task,
                         "metric": "acc", "value": 0.9, "stderr": 0.01})
            rows.append({"experiment": "sequential", "method": method, "batch_size": batch, "n_edits": 16, "task": task,
                         "metric": "acc", "value": after, "stderr": 0.01})
    found = {row["method"]: row for row in bigger_batches_erode_less(pd.DataFrame(rows))}
    assert set(found) == {"memit", "emmet"}
    # +0.10 +- 1.96 * sqrt(4 * 0.01^2) / 2 = +0.10 +- 0.0196
    assert found["memit"]["verdict"] == REPRODUCED and "+0.100 [+0.080, +0.120]" in found["memit"]["evidence"]
    assert found["emmet"]["verdict"] == INCONCLUSIVE


def _sequential_downstream(finals: dict, n_edits: int = 16, base: float = 0.9, model: str = "toy") -> pd.DataFrame:
    rows = []
    for (method, batch), after in finals.items():
        for task in ("a", "b"):
            rows.append({"experiment": "sequential", "model": model, "method": method, "batch_size": batch, "n_edits": 0,
                         "task": task, "metric": "acc", "value": base, "stderr": 0.01})
            rows.append({"experiment": "sequential", "model": model, "method": method, "batch_size": batch,
                         "n_edits": n_edits, "task": task, "metric": "acc", "value": after, "stderr": 0.01})
    return pd.DataFrame(rows)


def test_alphaedit_is_compared_with_the_memit_block_of_its_suffix_at_each_batch_size():
    downstream = _sequential_downstream({("memit", 1): 0.60, ("alphaedit", 1): 0.80,          # +0.20: reproduced
                                         ("memit", 16): 0.80, ("alphaedit", 16): 0.79,        # -0.01: inconclusive
                                         ("memit-5layer", 1): 0.85, ("alphaedit-5layer", 1): 0.50,  # -0.35
                                         ("alphaedit", 4): 0.5, ("rome", 1): 0.1})             # no MEMIT at b=4
    found = {row["method"]: row for row in projection_erodes_less(downstream)}
    assert set(found) == {"alphaedit b=1", "alphaedit b=16", "alphaedit-5layer b=1"}
    # +0.20 +- 1.96 * sqrt(4 * 0.01^2) / 2 = +0.20 +- 0.0196
    assert found["alphaedit b=1"]["verdict"] == REPRODUCED
    assert "alphaedit minus memit: +0.200 [+0.180, +0.220] (memit 0.600, alphaedit 0.800)" in found["alphaedit b=1"]["evidence"]
    assert found["alphaedit b=16"]["verdict"] == INCONCLUSIVE
    assert found["alphaedit-5layer b=1"]["verdict"] == NOT_REPRODUCED
    assert "alphaedit-5layer minus memit-5layer: -0.350" in found["alphaedit-5layer b=1"]["evidence"]


def test_alphaedit_and_memit_are_compared_at_the_largest_count_both_evaluated():
    downstream = pd.concat([_sequential_downstream({("memit", 1): 0.60}, n_edits=16),
                            _sequential_downstream({("alphaedit", 1): 0.70}, n_edits=16),
                            _sequential_downstream({("alphaedit", 1): 0.20}, n_edits=32),
                            _sequential_downstream({("memit", 1): 0.20}, n_edits=24)], ignore_index=True)
    (row,) = projection_erodes_less(downstream)
    assert "after 16 edits (b=1)" in row["evidence"] and row["verdict"] == REPRODUCED


def test_deeper_layers_compare_the_configured_pairs_at_their_common_batch_size():
    downstream = _sequential_downstream({("rome", 1): 0.60, ("rome-deep", 1): 0.70, ("rome-deep", 4): 0.10,
                                         ("memit-l0", 1): 0.80, ("memit", 1): 0.79})
    pairs = [{"shallow": "rome", "deep": "rome-deep"}, {"shallow": "memit-l0", "deep": "memit"},
             {"shallow": "rome", "deep": "absent"}]
    tables = ablation_tables(downstream, {"edited_layers": pairs})
    assert set(tables["edited_layers"]["batch_size"]) == {1}  # the pairs' common batch size
    found = {row["method"]: row for row in ablation_findings(tables)}
    assert set(found) == {"rome vs rome-deep on toy", "memit-l0 vs memit on toy"}  # a pair without runs is left out
    assert found["rome vs rome-deep on toy"]["verdict"] == REPRODUCED  # +0.10 +- 0.0196, at b=1 (b=4 ignored)
    assert "+0.100 [+0.080, +0.120]" in found["rome vs rome-deep on toy"]["evidence"]
    assert found["memit-l0 vs memit on toy"]["verdict"] == INCONCLUSIVE
    assessed = assess({"edits": pd.DataFrame(), "layer_sweep": pd.DataFrame(), "downstream": downstream,
                       "traces": pd.DataFrame()}, ablation_tables(downstream, {"edited_layers": pairs[:1]}))
    assert assessed["finding"].str.startswith("deeper edited layers").sum() == 1


def test_model_pairs_compare_each_models_own_drop():
    """Two models start from different accuracies: the arms' drops are compared, with the four
    measurements' standard errors: drop 0.3 on the smaller, 0.1 on the larger model."""
    downstream = pd.concat([_sequential_downstream({("memit", 1): 0.5}, base=0.8, model="small"),
                            _sequential_downstream({("memit", 1): 0.8}, base=0.9, model="large")])
    tables = ablation_tables(downstream, {"model_size": [{"smaller": "small", "larger": "large"}]})
    assert set(tables["model_size"]["role"]) == {"smaller", "larger"}
    [row] = ablation_findings(tables)
    # each drop +- 1.96 * sqrt(4 * 0.01^2) / 2 = 0.0196; their difference +- hypot(0.0196, 0.0196) = 0.0277
    assert row["verdict"] == REPRODUCED and "+0.200 [+0.172, +0.228]" in row["evidence"], row
    assert row["method"] == "memit: small vs large"


def test_samples_are_averaged_with_their_spread():
    runs = [_sequential_downstream({("memit", 1): after}).assign(sample=sample) for sample, after in enumerate((0.5, 0.6, 0.7))]
    mean = over_samples(pd.concat(runs))
    final = mean[mean["n_edits"] == 16]
    assert final["value"].round(6).tolist() == [0.6, 0.6]
    assert final["spread_lo"].round(6).tolist() == [0.5, 0.5] and final["spread_hi"].round(6).tolist() == [0.7, 0.7]
    # the samples spread (sd 0.1) far beyond their own errors (0.01): the error is sd / sqrt(3)
    assert final["stderr"].round(6).tolist() == [round(0.1 / math.sqrt(3), 6)] * 2
    # before editing, the three runs measured the one unedited model: its own standard error
    assert mean.loc[mean["n_edits"] == 0, "stderr"].tolist() == [0.01, 0.01]
    [row] = downstream_erosion(pd.concat(runs))
    assert "mean of 3 disjoint edit samples, whose drops are +0.400, +0.300, +0.200" in row["evidence"]
    # after: t(2 df) x 0.1 / sqrt(3) = 0.2484; before: 1.96 x sqrt(2 x 0.01^2) / 2 = 0.0139; hypot 0.2488
    assert "+0.300 [+0.051, +0.549]" in row["evidence"], row["evidence"]
    per_sample = sample_table(pd.concat(runs))
    assert per_sample["drop"].round(6).tolist() == [0.4, 0.3, 0.2]
    # +-1.96 * sqrt(2 tasks x (0.01^2 + 0.01^2)) / 2 tasks
    assert (per_sample["drop_hi"] - per_sample["drop"]).round(6).tolist() == [round(1.959964 * 0.02 / 2, 6)] * 3


def test_samples_that_agree_within_their_errors_keep_the_errors():
    """Samples 0.6 +- 0.01 and 0.61 +- 0.01: their spread (sd 0.007) is below their own errors, so
    the mean's error is the errors' (sqrt(0.01^2 / 2)) and its interval +-1.96 of it."""
    runs = [_sequential_downstream({("memit", 1): after}).assign(sample=sample) for sample, after in enumerate((0.6, 0.61))]
    final = over_samples(pd.concat(runs)).query("n_edits == 16")
    assert final["stderr"].round(8).tolist() == [round(0.01 / math.sqrt(2), 8)] * 2


def test_the_samples_spread_is_taken_between_their_means_over_tasks():
    """A sample's effect on every task at once widens the interval; samples that trade one task
    for another by the same amount have equal means over tasks and leave it as the errors give it."""
    def run(values_by_sample):
        rows = []
        for sample, (a, b) in enumerate(values_by_sample):
            for task, after in (("a", a), ("b", b)):
                for n_edits, value in ((0, 0.9), (16, after)):
                    rows.append({"experiment": "sequential", "model": "toy", "method": "memit", "batch_size": 1,
                                 "sample": sample, "n_edits": n_edits, "task": task, "metric": "acc", "value": value,
                                 "stderr": 0.01})
        return pd.DataFrame(rows)

    [traded] = downstream_erosion(run([(0.5, 0.7), (0.7, 0.5), (0.6, 0.6)]))
    # errors only: after sqrt(mean(0.01^2 x 2 / 4) / 3) = 0.00408, before 0.00707: 1.96 x hypot = 0.0160
    assert "+0.300 [+0.284, +0.316]" in traded["evidence"], traded["evidence"]
    [shared] = downstream_erosion(run([(0.5, 0.5), (0.7, 0.7), (0.6, 0.6)]))
    assert "+0.300 [+0.051, +0.549]" in shared["evidence"], shared["evidence"]


def test_a_model_pair_is_inconclusive_when_one_sample_carries_the_difference():
    """The chat model loses 0.01, 0.01 and 0.08 on its three samples, the base model 0.007 on each:
    the mean difference (0.026) is within the chat samples' spread."""
    def model(name, drops):
        return pd.concat([_sequential_downstream({("memit", 1): 0.9 - drop}, model=name).assign(sample=sample)
                          for sample, drop in enumerate(drops)])

    downstream = pd.concat([model("base", (0.007, 0.007, 0.007)), model("chat", (0.01, 0.01, 0.08))])
    tables = ablation_tables(downstream, {"instruction_tuning": [{"base": "base", "chat": "chat"}]})
    assert set(tables["instruction_tuning"]["sample"]) == {0, 1, 2}  # one row per sample
    [row] = ablation_findings(tables)
    assert row["verdict"] == INCONCLUSIVE and "-0.026 [" in row["evidence"], row


def test_two_runs_on_the_same_samples_are_compared_sample_by_sample():
    """Batches of 16 keep 0.03 more accuracy than single edits on each of three samples, one of
    which erodes far more under both: the per-sample differences agree, so the interval is the
    errors' (+0.030 +- 1.96 x sqrt(0.01^2 / 3)), not the two runs' spread (+-0.14)."""
    runs = [_sequential_downstream({("memit", 1): after, ("memit", 16): after + 0.03}).assign(sample=sample)
            for sample, after in enumerate((0.89, 0.89, 0.82))]
    [row] = bigger_batches_erode_less(pd.concat(runs))
    assert row["verdict"] == REPRODUCED and "+0.030 [+0.019, +0.041]" in row["evidence"], row


def test_ablations_figure_draws_every_pair(tmp_path):
    from editlib.study.plotting import ablations_figure

    downstream = _sequential_downstream({("rome", 1): 0.6, ("rome-deep", 1): 0.7, ("rome-flat", 1): 0.5})
    path = tmp_path / "ablations.png"
    ablations_figure(ablation_tables(downstream, {"edited_layers": [{"shallow": "rome", "deep": "rome-deep"}],
                                                  "constraint": [{"with": "rome", "without": "rome-flat"}]}), path)
    assert path.stat().st_size > 10_000


def test_tracing_agreement_is_within_one_layer():
    traces = pd.DataFrame([{"case_id": c, "kind": "mlp", "token": "subject_last", "layer": layer,
                            "effect": {0: 0.1, 1: 0.3, 2: 0.2, 3: 0.0}[layer]} for c in range(3) for layer in range(4)])
    sweep = pd.DataFrame([_row(method="rome", layers=str(layer), S=s) for layer, s in ((0, 50.0), (1, 60.0), (2, 40.0))]
                         + [_row(method="memit", layers=str(layer), S=s) for layer, s in ((0, 50.0), (3, 60.0))])
    verdicts = {row["method"]: row["verdict"] for row in tracing_matches_sweep(traces, sweep)}
    assert verdicts == {"rome": REPRODUCED, "memit": NOT_REPRODUCED}


def test_assess_skips_findings_without_their_experiment():
    empty = pd.DataFrame()
    assert assess({"edits": empty, "layer_sweep": empty, "downstream": empty, "traces": empty}).empty
    # no downstream tasks: every ablation table and the per-sample one are empty, with their columns
    tables = ablation_tables(empty, {"batch_size": ["memit"], "constraint": [{"with": "rome", "without": "flat"}]})
    assert all(table.empty and len(table.columns) > 0 for table in [*tables.values(), sample_table(empty)])


@pytest.mark.parametrize("verdict", [REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE])
def test_verdict_names_are_distinct(verdict):
    assert [REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE].count(verdict) == 1


def test_edit_metrics_are_averaged_over_samples_bounds_included():
    from editlib.study.tables import edits_over_samples

    base = {"experiment": "sequential", "scope": "edited_so_far", "n_edits": 8}
    edits = pd.DataFrame([_row(**base, sample=0, ES=90.0), _row(**base, sample=1, ES=80.0),
                          _row(**{**base, "n_edits": 4}, sample=0, ES=70.0)])
    mean = edits_over_samples(edits).set_index("n_edits")
    assert mean.loc[8, ["ES", "ES_lo", "ES_hi", "n_samples"]].tolist() == [85.0, 84.0, 86.0, 2]
    assert mean.loc[4, ["ES", "n_samples"]].tolist() == [70.0, 1]
    assert edits_over_samples(edits[edits["sample"] == 0]).equals(edits[edits["sample"] == 0])  # one sample: as is


@pytest.mark.parametrize("script", ["tidy_results", "findings", "figures"])
def test_reporting_jobs_import_no_torch(script):
    """The jobs that only read and write tables (tidy_results, findings, figures) import neither
    torch nor transformers: seconds saved on every run and every `--forcerun figures`."""
    import subprocess
    import sys
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
    import ast

    source = (scripts / f"{script}.py").read_text()
    imports = [ast.get_source_segment(source, node) for node in ast.parse(source).body
               if isinstance(node, (ast.Import, ast.ImportFrom))]
    code = "\n".join([f"import sys; sys.path.append({str(scripts)!r})", *imports,
                      "heavy = sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules)",
                      "assert not heavy, heavy"])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
