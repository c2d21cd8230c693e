"""The default's verdicts are the committed ones: a fresh run of `config.yaml` (the pinned toy
model, models/toy-5L) gives docs/findings-default.csv's verdict for every finding, and
docs/edits-default.csv's edit metrics (every row over at least 64 facts) within EDIT_TOLERANCE
(editlib.study.compare). On the machine that made the files the tables are identical; on another CPU
editing rounds differently (a fact near its margin can flip), and a verdict near its threshold could
flip: the test says which, with the CPU and the largest difference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from editlib.study.compare import COMMITTED_DEFAULT, EDIT_KEY, EDIT_TOLERANCE, FINDING_KEY, compare_runs, run_tables
from editlib.toy.pinned import machine

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def test_the_committed_findings_cover_every_finding_once():
    edits = pd.read_csv(COMMITTED_DEFAULT["edits"])
    assert not edits.duplicated(EDIT_KEY).any() and (edits["n_records"] >= 64).all()
    assert set(edits["scope"]) == {"single", "batch", "edited_so_far"}
    committed = pd.read_csv(COMMITTED_DEFAULT["findings"])
    assert not committed.duplicated(FINDING_KEY).any()
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
    assert "mend editor: pinned" in (tmp_path / "logs" / "toy" / "toy-5L" / "train_mend.log").read_text()
    comparison = compare_runs(run_tables(tmp_path / "results" / "toy"), COMMITTED_DEFAULT)
    cpu = machine()
    assert not comparison.changed_verdicts, f"verdicts changed on {cpu}: {comparison.changed_verdicts}"
    assert comparison.within(EDIT_TOLERANCE), f"on {cpu}: {comparison.edits_over_min_records}"
