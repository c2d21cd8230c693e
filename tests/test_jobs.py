"""Every workflow job runs inside study.jobs.stage_logging: one log file, fixed threads and seeds,
and a first line that says what decides how floats round on this machine."""

from __future__ import annotations

import random

import torch

from editlib.study.jobs import stage_logging


def test_a_job_log_names_torch_its_cpu_capability_and_threads(tmp_path):
    log = tmp_path / "logs" / "job.log"
    with stage_logging(log, threads=1):
        pass
    text = log.read_text()
    assert f"torch {torch.__version__}" in text
    assert f"CPU capability {torch.backends.cpu.get_cpu_capability()}" in text
    assert "1 threads" in text


def test_a_job_starts_from_the_same_random_state_every_time(tmp_path):
    draws = []
    for run in range(2):
        with stage_logging(tmp_path / f"{run}.log", threads=1, seed=3):
            draws.append((random.random(), torch.rand(3).tolist()))
    assert draws[0] == draws[1]


def test_a_failing_job_leaves_its_traceback_in_its_log(tmp_path):
    log = tmp_path / "job.log"
    try:
        with stage_logging(log, uses_torch=False):
            raise RuntimeError("records file has no field 'subject'")
    except RuntimeError:
        pass
    text = log.read_text()
    assert "stage failed" in text and "records file has no field 'subject'" in text
