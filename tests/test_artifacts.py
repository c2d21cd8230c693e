"""A truncated or corrupt artifact: an error that names the file and how to rebuild it; caches
still treat such a file as a miss."""

from __future__ import annotations

import pytest
import torch
from safetensors import SafetensorError

from editlib.io import ArtifactError, load_tensors, read_metadata, save_tensors


@pytest.fixture
def truncated(tmp_path):
    path = tmp_path / "stats" / "second_moments.safetensors"
    save_tensors(path, {"layer.0": torch.eye(64), "layer.1": torch.eye(64)}, {"counts": "{}"})
    path.write_bytes(path.read_bytes()[:-100])  # a copy cut short
    return path


@pytest.mark.parametrize("read", [load_tensors, read_metadata])
def test_truncated_file_names_itself_and_the_rebuild(truncated, read):
    with pytest.raises(ArtifactError) as err:
        read(truncated)
    message = str(err.value)
    assert str(truncated) in message and "truncated or corrupt" in message
    assert f"rm {truncated}" in message and "rerun the same snakemake command" in message
    # still the types the cache readers catch
    assert isinstance(err.value, SafetensorError) and isinstance(err.value, ValueError)


def test_truncated_moments_name_the_statistics_rule(truncated):
    from editlib.editing.statistics import load_moments

    with pytest.raises(ArtifactError, match=r"--forcerun statistics") as err:
        load_moments(truncated, [0])
    assert str(truncated) in str(err.value)


def test_missing_file_is_not_an_artifact_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "absent.safetensors")


def test_truncated_checkpoint_is_a_miss(tmp_path):
    from editlib.study.experiments import _load_checkpoint

    path = tmp_path / "run.ckpt.safetensors"
    save_tensors(path, {"w": torch.ones(32, 32)}, {"key": "k", "step": "1", "rows": "[]", "downstream": "[]", "steps": "[]"})
    assert _load_checkpoint(path, "k") is not None
    path.write_bytes(path.read_bytes()[:50])
    assert _load_checkpoint(path, "k") is None
