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
from conftest import MinutePerReading
from safetensors import safe_open
from safetensors.torch import load_file

JOB = Path(__file__).parent / "sequential_job.py"


def checkpoint_step(path: Path) -> int:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return int(handle.metadata()["step"])
    except Exception:
        return 0


def run_job(method, checkpoint, out, kill_after_step=None, checkpoint_minutes=None):
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    extra = [] if checkpoint_minutes is None else [str(checkpoint_minutes)]
    process = subprocess.Popen([sys.executable, str(JOB), method, str(checkpoint), str(out), *extra], env=env,
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


@pytest.mark.parametrize("method,minutes", [("alphaedit", None), ("grace", None),
                                            pytest.param("alphaedit", 2.5, marks=pytest.mark.slow)])
def test_killed_run_resumes_bit_identical(method, minutes, tmp_path):
    """Killed after a checkpoint: with a checkpoint after every batch (minutes None), or (2.5
    minutes of a clock that advances a minute per reading: checkpoints after batches 3 and 6)
    between checkpoints, so the batches after batch 3 are replayed."""
    straight_ckpt, straight_out = tmp_path / "straight.safetensors", tmp_path / "straight.csv"
    run_job(method, straight_ckpt, straight_out, checkpoint_minutes=minutes)

    ckpt, out = tmp_path / "resumed.safetensors", tmp_path / "resumed.csv"
    run_job(method, ckpt, out, kill_after_step=2, checkpoint_minutes=minutes)
    killed_at = checkpoint_step(ckpt)
    assert (killed_at == 3 if minutes else 2 <= killed_at < 6) and not out.exists()
    assert load_file(str(ckpt))  # the checkpoint on disk is complete despite the kill
    run_job(method, ckpt, out, checkpoint_minutes=minutes)

    straight, resumed = pd.read_csv(straight_out), pd.read_csv(out)
    pd.testing.assert_frame_equal(straight, resumed, check_exact=True)
    assert len(resumed) == 12 and resumed["n_edits"].max() == 6
    a, b = load_file(str(straight_ckpt)), load_file(str(ckpt))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    with safe_open(str(ckpt), framework="pt") as resumed_meta, safe_open(str(straight_ckpt), framework="pt") as meta:
        assert json.loads(resumed_meta.metadata()["rows"]) == json.loads(meta.metadata()["rows"])


# ---------------------------------------------------------------------------- in-process: checkpoint interval and replay


@pytest.fixture
def grace_run(llama_tokenizer):
    """(ctx, requests, spec) of a small GRACE run on a random 2-layer model."""
    from conftest import make_llama, make_requests

    from editlib.methods.grace import GraceHparams
    from editlib.study.experiments import ExperimentContext

    torch.set_num_threads(1)
    ctx = ExperimentContext(make_llama(llama_tokenizer, layers=2), llama_tokenizer, "tiny", {}, progress=False)
    return ctx, make_requests(6), GraceHparams(layers=(1,), n_iter=3)


def _checkpoint_writes(monkeypatch) -> list[int]:
    """The steps of every checkpoint written from now on."""
    import editlib.study.experiments as experiments

    steps, save = [], experiments._save_checkpoint
    monkeypatch.setattr(experiments, "_save_checkpoint",
                        lambda path, editor, key, step, *rest: (steps.append(step), save(path, editor, key, step, *rest)))
    return steps


def test_checkpoints_are_written_at_most_once_per_interval_and_after_the_last_batch(grace_run, tmp_path, monkeypatch):
    from editlib.study.experiments import sequential_edits

    ctx, requests, spec = grace_run
    steps = _checkpoint_writes(monkeypatch)
    sequential_edits(ctx, requests, spec, 1, 6, tmp_path / "every.safetensors", checkpoint_minutes=0)
    assert steps == [1, 2, 3, 4, 5, 6]
    steps.clear()
    # the clock reads 1 minute at the start and one more at every batch; a save resets the interval
    sequential_edits(ctx, requests, spec, 1, 6, tmp_path / "interval.safetensors", checkpoint_minutes=2.5,
                     clock=MinutePerReading())
    assert steps == [3, 6]
    steps.clear()
    sequential_edits(ctx, requests, spec, 1, 6, tmp_path / "default.safetensors", checkpoint_minutes=10)
    assert steps == [6]  # a run shorter than the interval writes its checkpoint once, at the end


def _crash_at_scoring(monkeypatch, call: int) -> None:
    """The `call`-th scoring of the next run raises (a crash within that batch)."""
    import editlib.study.experiments as experiments

    calls, score = [], experiments.score_records

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt("crash")
        return score(*args, **kwargs)

    monkeypatch.setattr(experiments, "score_records", crashing)


@pytest.mark.parametrize("lose_a_state", [False, True])
def test_a_crash_between_checkpoints_replays_to_identical_rows_and_states(grace_run, tmp_path, monkeypatch, lose_a_state):
    """Checkpoints after batches 3 and 6; the crash lands in batch 5, after the state of 4 edits was
    saved: the resumed run replays batches 4-6 (4 and 5 a second time) and its rows and every
    saved state equal the uninterrupted run's. With the state of 2 edits (before the checkpoint)
    lost, it starts over and still writes every state."""
    from editlib.study.experiments import sequential_edits

    ctx, requests, spec = grace_run
    counts = (2, 4, 6)
    straight_states = {n: tmp_path / "straight" / f"n{n}.safetensors" for n in counts}
    straight, _, straight_steps = sequential_edits(ctx, requests, spec, 1, 6, tmp_path / "straight.safetensors",
                                                   eval_at=[2, 4], states=straight_states, checkpoint_minutes=2.5,
                                                   clock=MinutePerReading())
    states = {n: tmp_path / "resumed" / f"n{n}.safetensors" for n in counts}
    checkpoint = tmp_path / "resumed.safetensors"
    with monkeypatch.context() as patch:
        _crash_at_scoring(patch, 5)
        with pytest.raises(KeyboardInterrupt):
            sequential_edits(ctx, requests, spec, 1, 6, checkpoint, eval_at=[2, 4], states=states,
                             checkpoint_minutes=2.5, clock=MinutePerReading())
    assert checkpoint_step(checkpoint) == 3 and states[4].exists() and not states[6].exists()
    if lose_a_state:
        states[2].unlink()
    steps = _checkpoint_writes(monkeypatch)
    resumed, _, resumed_steps = sequential_edits(ctx, requests, spec, 1, 6, checkpoint, eval_at=[2, 4], states=states,
                                                 checkpoint_minutes=2.5, clock=MinutePerReading())
    assert steps == ([3, 6] if lose_a_state else [6])  # started over, or resumed after batch 3
    pd.testing.assert_frame_equal(straight, resumed, check_exact=True)
    pd.testing.assert_frame_equal(straight_steps, resumed_steps, check_exact=True)
    assert list(resumed_steps["n_edits"]) == [1, 2, 3, 4, 5, 6]
    for n in counts:
        a, b = load_file(str(straight_states[n])), load_file(str(states[n]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), n
