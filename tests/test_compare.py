"""editlib.study.compare: a run against a reference, verdict by verdict and metric by metric."""

from __future__ import annotations

import pandas as pd
import pytest

from editlib.study.compare import ComparisonError, compare_runs, main, run_tables
from editlib.study.tables import DOWNSTREAM_COLUMNS, RESULT_COLUMNS


def _write_run(folder, verdicts=("reproduced", "not reproduced"), es=(100.0, 90.0), accuracy=(0.8, 0.7)):
    folder.mkdir(parents=True)
    pd.DataFrame({"study": "S", "finding": ["f1", "f2"], "model": "toy", "method": "rome",
                  "evidence": "e", "verdict": list(verdicts)}).to_csv(folder / "findings.csv", index=False)
    edits = pd.DataFrame([{column: 0 for column in RESULT_COLUMNS} for _ in es])
    edits = edits.assign(experiment="sequential", model="toy", method="rome", layers="0,1", scope="edited_so_far",
                         records="counterfact", n_edits=[8, 128], n_records=[8, 128], ES=list(es),
                         PS=95.0, NS=80.0, S=88.0)
    edits.to_csv(folder / "edits.csv", index=False)
    downstream = pd.DataFrame([{column: 0 for column in DOWNSTREAM_COLUMNS} for _ in accuracy])
    downstream.assign(experiment="sequential", model="toy", method="rome", task="toy_facts", metric=["acc", "acc_norm"],
                      value=list(accuracy), error=None).to_csv(folder / "downstream.csv", index=False)
    return run_tables(folder)


def test_identical_runs_compare_equal(tmp_path):
    comparison = compare_runs(_write_run(tmp_path / "a"), _write_run(tmp_path / "b"))
    assert comparison.verdicts == 2 and not comparison.changed_verdicts
    assert comparison.edits.value == 0 and comparison.downstream.value == 0 and comparison.within()


def test_a_changed_verdict_and_the_largest_metric_difference_are_named(tmp_path):
    reference = _write_run(tmp_path / "reference")
    run = _write_run(tmp_path / "run", verdicts=("reproduced", "inconclusive"), es=(100.0, 96.875),
                     accuracy=(0.8, 0.64))
    comparison = compare_runs(run, reference)
    assert comparison.changed_verdicts == {("S", "f2", "toy", "rome"): ("not reproduced", "inconclusive")}
    assert comparison.edits.value == pytest.approx(6.875) and comparison.edits.column == "ES"
    assert "128" in comparison.edits.row and "8" not in comparison.edits.row
    many = comparison.edits_over_min_records
    assert many.value == pytest.approx(6.875) and many.rows == 1
    assert comparison.downstream.value == pytest.approx(0.06) and "acc_norm" in comparison.downstream.row
    assert not comparison.within(5.0)
    assert any("not reproduced -> inconclusive" in line for line in comparison.lines())


def test_metric_differences_within_the_tolerance_give_the_same_answer(tmp_path):
    comparison = compare_runs(_write_run(tmp_path / "run", es=(100.0, 88.0)), _write_run(tmp_path / "reference"))
    assert comparison.edits.value == pytest.approx(2.0)
    assert comparison.within(2.0) and not comparison.within(1.0)


def test_a_reference_row_the_run_lacks_is_an_error_naming_the_file(tmp_path):
    reference = _write_run(tmp_path / "reference")
    run = _write_run(tmp_path / "run")
    edits = pd.read_csv(run["edits"])
    edits.iloc[:1].to_csv(run["edits"], index=False)
    with pytest.raises(ComparisonError, match=r"run/edits.csv lacks 1 rows"):
        compare_runs(run, reference)


def test_the_command_exits_1_on_a_different_answer_and_2_on_a_missing_table(tmp_path, capsys):
    _write_run(tmp_path / "reference")
    _write_run(tmp_path / "run", verdicts=("inconclusive", "not reproduced"))
    assert main([str(tmp_path / "reference"), "--reference", str(tmp_path / "reference")]) == 0
    assert main([str(tmp_path / "run"), "--reference", str(tmp_path / "reference")]) == 1
    assert "different answer" in capsys.readouterr().out
    (tmp_path / "run" / "edits.csv").unlink()
    assert main([str(tmp_path / "run"), "--reference", str(tmp_path / "reference")]) == 2
    assert "no edits table" in capsys.readouterr().err


def test_a_flip_in_a_row_over_few_facts_is_reported_but_within_the_tolerance(tmp_path):
    """One of 8 facts flipping moves ES by 12.5 points: named as the largest difference, but the
    tolerance holds for the rows over at least MIN_RECORDS facts."""
    comparison = compare_runs(_write_run(tmp_path / "run", es=(87.5, 90.0)), _write_run(tmp_path / "reference"))
    assert comparison.edits.value == pytest.approx(12.5) and "8" in comparison.edits.row
    assert comparison.edits_over_min_records.value == 0 and comparison.within(5.0)
    assert any(line.startswith("edits over >= 64 facts: 1 rows") for line in comparison.lines())
