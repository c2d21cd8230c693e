"""Which findings keep their verdict across runs (e.g. toy models trained with different seeds)?

Reads the findings.csv of each run and prints one row per (finding, model, method) with each
run's verdict and the number of runs that agree with the most common one (the seeded toy models
below share the model name toy-5L, so their rows line up).

What it shows: which findings of docs/toy_model.md hold for toy models trained with other seeds.
Run from the repository root after the runs:

    python analyses/verdicts_across_runs.py results/toy results/toy-train-seed1 results/toy-train-seed2

The seeded runs come from config.yaml with `model.train.seed` (and `run`) changed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="results/<run> folders holding findings.csv")
    args = parser.parse_args()
    frames = []
    for run in args.runs:
        findings = pd.read_csv(run / "findings.csv")
        if "model" not in findings.columns:  # written before runs held several models
            findings = findings.assign(model="")
        frames.append(findings.assign(run=run.name, model=findings["model"].fillna(""))[
            ["finding", "model", "method", "run", "verdict"]])
    table = pd.concat(frames).pivot_table(index=["finding", "model", "method"], columns="run", values="verdict",
                                          aggfunc="first", sort=False)
    table = table[[run.name for run in args.runs]]
    table["agree"] = [f"{row.value_counts().iloc[0]}/{row.notna().sum()}" for _, row in table.iterrows()]
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 60):
        print(table.to_string())


if __name__ == "__main__":
    main()
