"""The default's verdicts are the committed ones: a fresh run of `config.yaml` (the pinned toy
model, models/toy-5L) gives docs/findings-default.csv's verdict for every finding, and
docs/edits-default.csv's edit metrics (every row over at least 64 facts) within EDIT_TOLERANCE. On
the machine that made the files the tables are identical; on another CPU editing rounds
differently (a fact near its margin can flip), and a verdict near its threshold could flip: the
test says which, with the CPU and the largest difference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from editlib.toy.pinned import machine

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
COMMITTED = REPO / "docs" / "findings-default.csv"
COMMITTED_EDITS = REPO / "docs" / "edits-default.csv"
KEY = ["study", "finding", "model", "method"]
EDIT_KEY = ["experiment", "model", "method", "layers", "batch_size", "sample", "n_edits", "step", "scope"]
EDIT_METRICS = ["ES", "PS", "NS", "S"]
# float noise of editing on another CPU: a few of the 64-768 facts of a row flipping (1.6 points each at 64)
EDIT_TOLERANCE = 5.0


def test_the_committed_findings_cover_every_finding_once():
    edits = pd.read_csv(COMMITTED_EDITS)
    assert not edits.duplicated(EDIT_KEY).any() and (edits["n_records"] >= 64).all()
    assert set(edits["scope"]) == {"single", "batch", "edited_so_far"}
    committed = pd.read_csv(COMMITTED)
    assert not committed.duplicated(KEY).any()
    assert set(committed["verdict"]) <= {"reproduced", "not reproduced", "inconclusive"}
    assert len(committed) >= 20


@pytest.mark.slow  # the whole default DAG: about 15 minutes on 2 cores
def test_a_fresh_run_of_the_default_gives_the_committed_verdicts(tmp_path):
    env = {**os.environ, "PATH": f"{SNAKEMAKE.parent}{os.pathsep}{os.environ['PATH']}"}
    command = [str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
               "--configfile", str(REPO / "config.yaml"), "--cores", "2", "results/toy/findings.csv"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=3600)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "model: pinned" in (tmp_path / "logs" / "toy" / "toy-5L" / "prepare_model.log").read_text()
    fresh = pd.read_csv(tmp_path / "results" / "toy" / "findings.csv").set_index(KEY)["verdict"]
    committed = pd.read_csv(COMMITTED).set_index(KEY)["verdict"]
    assert sorted(fresh.index) == sorted(committed.index)
    changed = {key: (committed[key], fresh[key]) for key in committed.index if fresh[key] != committed[key]}
    cpu = machine()
    assert not changed, f"verdicts changed on {cpu}: {changed}"
    edits = pd.read_csv(tmp_path / "results" / "toy" / "edits.csv", dtype={"layers": str}).set_index(EDIT_KEY)
    expected = pd.read_csv(COMMITTED_EDITS, dtype={"layers": str}).set_index(EDIT_KEY)
    assert expected.index.isin(edits.index).all()
    difference = (edits.loc[expected.index, EDIT_METRICS] - expected[EDIT_METRICS]).abs()
    largest = difference.stack().idxmax()
    assert difference.max().max() <= EDIT_TOLERANCE, (
        f"on {cpu} the edit metrics differ by up to {difference.max().max():.2f} points ({largest})")
