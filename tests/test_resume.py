"""A sequential run killed with SIGKILL mid-way resumes to bit-identical results."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

JOB = Path(__file__).parent / "sequential_job.py"


def checkpoint_step(path: Path) -> int:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return int(handle.metadata()["step"])
    except Exception:
        return 0


def run_job(method, checkpoint, out, kill_after_step=None):
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(JOB), method, str(checkpoint), str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after_step is None:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        return
    deadline = time.time() + 600
    while checkpoint_step(checkpoint) < kill_after_step:
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("method", ["alphaedit", "grace"])
def test_killed_run_resumes_bit_identical(method, tmp_path):
    straight_ckpt, straight_out = tmp_path / "straight.safetensors", tmp_path / "straight.csv"
    run_job(method, straight_ckpt, straight_out)

    ckpt, out = tmp_path / "resumed.safetensors", tmp_path / "resumed.csv"
    run_job(method, ckpt, out, kill_after_step=2)
    killed_at = checkpoint_step(ckpt)
    assert 2 <= killed_at < 6 and not out.exists()
    assert load_file(str(ckpt))  # the checkpoint on disk is complete despite the kill
    run_job(method, ckpt, out)

    straight, resumed = pd.read_csv(straight_out), pd.read_csv(out)
    pd.testing.assert_frame_equal(straight, resumed, check_exact=True)
    assert len(resumed) == 12 and resumed["n_edits"].max() == 6
    a, b = load_file(str(straight_ckpt)), load_file(str(ckpt))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    with safe_open(str(ckpt), framework="pt") as resumed_meta, safe_open(str(straight_ckpt), framework="pt") as meta:
        assert json.loads(resumed_meta.metadata()["rows"]) == json.loads(meta.metadata()["rows"])
