"""Two runs of one config side by side: which findings' verdicts differ, and the largest differences
of the edit metrics (ES/PS/NS/S, percentage points) and of the downstream values. It answers "does my
run give the committed answer": the default's committed tables are docs/findings-default.csv and
docs/edits-default.csv, and `python -m editlib.study.compare results/toy` compares a run with them.

The same config run on two CPUs edits the same pinned weights (and MEND edits with the same pinned
editor), but every kernel may round floats differently, so a fact near its margin can flip and a
metric moves by a step of 100/n_records.

pandas only.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from editlib.study.tables import RESULT_COLUMNS
from editlib.toy.pinned import CHECKOUT

FINDING_KEY = ["study", "finding", "model", "method"]
EDIT_KEY = RESULT_COLUMNS[:RESULT_COLUMNS.index("scope") + 1]
EDIT_METRICS = ["ES", "PS", "NS", "S"]
DOWNSTREAM_KEY = ["experiment", "model", "method", "batch_size", "sample", "n_edits", "task", "metric"]
# The default's committed tables (docs/toy_model.md, "The pinned model"): its findings, and its edit
# metrics on the rows over at least 64 facts
COMMITTED_DEFAULT = {"findings": CHECKOUT / "docs" / "findings-default.csv",
                     "edits": CHECKOUT / "docs" / "edits-default.csv"}
# float noise of editing on another CPU: a few of the 64-768 facts of a row flipping (1.6 points each at
# 64); it applies to the rows over at least MIN_RECORDS facts (a row over one fact moves by 100 points
# when that fact flips)
EDIT_TOLERANCE = 5.0
MIN_RECORDS = 64


class ComparisonError(ValueError):
    """Two runs that cannot be compared: a table missing, or rows of the reference the run lacks."""


@dataclass
class Largest:
    """The largest absolute difference of some columns over the reference's rows, and where it is."""
    table: str
    rows: int
    unit: str
    value: float = 0.0
    column: str = ""
    row: tuple = ()

    def __str__(self) -> str:
        where = f" ({self.column} at {', '.join(map(str, self.row))})" if self.value > 0 else ""
        return f"{self.table}: {self.rows} rows, largest difference {self.value:.4g} {self.unit}{where}"


@dataclass
class Comparison:
    """What differs between a run and its reference."""
    verdicts: int = 0
    changed_verdicts: dict = field(default_factory=dict)   # finding key -> (reference, run)
    edits: Largest | None = None                          # ES/PS/NS/S, percentage points
    edits_over_min_records: Largest | None = None         # the rows over at least MIN_RECORDS facts
    downstream: Largest | None = None                     # task values (accuracies, 0-1)

    def within(self, edit_tolerance: float = EDIT_TOLERANCE) -> bool:
        """Every verdict equal and every edit metric over at least MIN_RECORDS facts within
        `edit_tolerance` points."""
        many = self.edits_over_min_records
        return not self.changed_verdicts and (many is None or many.value <= edit_tolerance)

    def lines(self) -> list[str]:
        lines = [f"findings: {self.verdicts} verdicts, {self.verdicts - len(self.changed_verdicts)} equal"]
        lines += [f"  changed: {' | '.join(key)}: {before} -> {after}"
                  for key, (before, after) in self.changed_verdicts.items()]
        parts = [self.edits, self.downstream]
        if self.edits is not None and self.edits_over_min_records.rows != self.edits.rows:
            parts.insert(1, self.edits_over_min_records)
        lines += [str(part) for part in parts if part is not None]
        return lines


def _keyed(frame: pd.DataFrame, key: list[str], path: Path) -> pd.DataFrame:
    missing = [column for column in key if column not in frame.columns]
    if missing:
        raise ComparisonError(f"{path}: no column {missing}; is it a {path.stem} table of this project?")
    frame = frame.astype({column: str for column in key}).set_index(key)
    if frame.index.duplicated().any():
        raise ComparisonError(f"{path}: rows repeat the key {frame.index[frame.index.duplicated()][0]}")
    return frame


def largest_difference(run: pd.DataFrame, reference: pd.DataFrame, key: list[str], columns: list[str],
                       table: str, unit: str, run_path: Path, reference_path: Path) -> Largest:
    """The largest |run - reference| over `columns` on the reference's rows; every one must be in the run."""
    run, reference = _keyed(run, key, run_path), _keyed(reference, key, reference_path)
    absent = reference.index.difference(run.index)
    if len(absent):
        raise ComparisonError(f"{run_path} lacks {len(absent)} rows of {reference_path}, e.g. {absent[0]}")
    difference = (run.loc[reference.index, columns] - reference[columns]).abs().stack()
    if difference.empty or not difference.max() > 0:
        return Largest(table, len(reference), unit)
    (*row, column), value = difference.idxmax(), float(difference.max())
    return Largest(table, len(reference), unit, value, column, tuple(row))


def compare_runs(run: dict[str, Path], reference: dict[str, Path]) -> Comparison:
    """Compare the tables `run` and `reference` name (findings, edits, downstream: a csv path each);
    tables the reference does not hold are not compared."""
    comparison = Comparison()
    for name in reference:
        if name not in run or not Path(run[name]).exists():
            raise ComparisonError(f"the run has no {name} table to compare with {reference[name]}")
    if "findings" in reference:
        paths = run["findings"], reference["findings"]
        ours, theirs = (_keyed(pd.read_csv(path), FINDING_KEY, Path(path))["verdict"] for path in paths)
        if sorted(ours.index) != sorted(theirs.index):
            raise ComparisonError(f"{paths[0]} and {paths[1]} hold different findings: "
                                  f"{sorted(set(ours.index) ^ set(theirs.index))[:3]}")
        comparison.verdicts = len(theirs)
        comparison.changed_verdicts = {key: (theirs[key], ours[key]) for key in theirs.index
                                       if ours[key] != theirs[key]}
    if "edits" in reference:
        paths = Path(run["edits"]), Path(reference["edits"])
        ours, theirs = (pd.read_csv(path, dtype={"layers": str}) for path in paths)
        comparison.edits = largest_difference(ours, theirs, EDIT_KEY, EDIT_METRICS, "edits", "points", *paths)
        many = theirs[theirs["n_records"] >= MIN_RECORDS]
        comparison.edits_over_min_records = largest_difference(ours, many, EDIT_KEY, EDIT_METRICS,
                                                               f"edits over >= {MIN_RECORDS} facts", "points", *paths)
    if "downstream" in reference:
        paths = Path(run["downstream"]), Path(reference["downstream"])
        ours, theirs = (pd.read_csv(path).dropna(subset=["value"]) for path in paths)
        comparison.downstream = largest_difference(ours, theirs, DOWNSTREAM_KEY, ["value"], "downstream",
                                                   "(task value)", *paths)
    return comparison


def run_tables(results: str | Path) -> dict[str, Path]:
    """A run's results folder (results/<run>) as the tables compare_runs reads."""
    return {name: Path(results) / f"{name}.csv" for name in ("findings", "edits", "downstream")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m editlib.study.compare",
        description="Compare a run's findings and edit metrics with a reference: by default the default "
                    "config's committed tables (docs/findings-default.csv, docs/edits-default.csv), or "
                    "another run's results folder. Exit 1 when a verdict differs or an edit metric over at "
                    f"least {MIN_RECORDS} facts moves by more than the tolerance.")
    parser.add_argument("results", help="the run's results folder, e.g. results/toy")
    parser.add_argument("--reference", help="another run's results folder (default: the committed default)")
    parser.add_argument("--tolerance", type=float, default=EDIT_TOLERANCE,
                        help=f"largest difference allowed in an edit metric over at least {MIN_RECORDS} facts, "
                             f"points (default {EDIT_TOLERANCE})")
    args = parser.parse_args(argv)
    reference = run_tables(args.reference) if args.reference else COMMITTED_DEFAULT
    try:
        comparison = compare_runs(run_tables(args.results), reference)
    except (ComparisonError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(comparison.lines()))
    same = comparison.within(args.tolerance)
    print("same answer" if same else f"different answer (tolerance {args.tolerance} points)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
