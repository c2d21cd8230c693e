"""Target values z of the unedited model, cached on disk and shared by every experiment.

A fact's z depends on the model state, the hooked module, the target hyperparameters, the context
templates and the fact, not on the other facts it is optimised with (independent deltas), so
MEMIT, EMMET and AlphaEdit with the same target hyperparameters, or the layer sweep and the
single-edit run at the same layer, need the same numbers. Up to float rounding (~1e-4) they
do depend on which facts share a padded batch, so that results never depend on which job fills
the cache first, facts are always optimised in the same blocks: block b holds records
[b*B, (b+1)*B) of the record pool (the records file) with B = facts_per_chunk, and a block is
computed and stored whole. Files are named by a content key of all of the above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from editlib.data.records import EditRequest
from editlib.editing.hparams import TargetHparams
from editlib.io import ArtifactError, content_key, load_tensors, save_tensors

log = logging.getLogger(__name__)

Optimize = Callable[[list[EditRequest]], tuple[torch.Tensor, torch.Tensor]]


def fact_key(request: EditRequest) -> tuple:
    """What a fact's z depends on from its record."""
    return (request.case_id, request.prompt, request.subject, request.target_new)


class TargetStore:
    """Blocks of z (d, B) and final losses (B,) under `root`, for facts of the record `pool`."""

    def __init__(self, root: str | Path, pool: Sequence[EditRequest], model_fingerprint: str):
        self.root = Path(root)
        self.pool = list(pool)
        self.fingerprint = model_fingerprint
        self.index = {fact_key(r): i for i, r in enumerate(self.pool)}
        self.hits = self.misses = 0

    def covers(self, request: EditRequest) -> bool:
        return fact_key(request) in self.index

    def block_path(self, block: int, size: int, hook_module: str, hparams: TargetHparams,
                   templates: Sequence[str]) -> Path:
        facts = [fact_key(r) for r in self.pool[block * size : (block + 1) * size]]
        key = content_key({"model": self.fingerprint, "module": hook_module, "hparams": dataclasses.asdict(hparams),
                           "templates": list(templates), "facts": facts})
        return self.root / f"z-{key}.safetensors"

    def targets(self, requests: Sequence[EditRequest], hook_module: str, hparams: TargetHparams,
                templates: Sequence[str], optimize: Optimize) -> tuple[torch.Tensor, torch.Tensor]:
        """z (d, N) and loss (N,) of `requests` (all in the pool), loading or computing whole blocks.

        Jobs running at the same time share the work: a block another job is computing (its lock
        is held) is left for later, and then read once that job has written it.
        """
        size = max(1, hparams.facts_per_chunk)
        positions = [self.index[fact_key(r)] for r in requests]
        blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        pending = sorted({p // size for p in positions})
        for wait in (False, True):  # first pass: blocks nobody is computing; second: wait for the rest
            deferred = []
            for block in pending:
                path = self.block_path(block, size, hook_module, hparams, templates)
                data = self._load(path)
                if data is None:
                    with _block_lock(path, wait) as locked:
                        if not locked:
                            deferred.append(block)
                            continue
                        data = self._load(path) or self._compute(path, block, size, hook_module, optimize)
                blocks[block] = data["values"], data["loss"]
            pending = deferred
        values = torch.stack([blocks[p // size][0][:, p % size] for p in positions], dim=1)
        loss = torch.stack([blocks[p // size][1][p % size] for p in positions])
        return values, loss

    def _load(self, path: Path) -> dict[str, torch.Tensor] | None:
        """A stored block, or None when it is absent or unreadable (a truncated file is a miss:
        the block is computed again and the file rewritten)."""
        if not path.exists():
            return None
        try:
            data = load_tensors(path)[0]
        except ArtifactError as err:
            log.warning("ignoring unreadable z block %s (%s); computing it again", path, err)
            return None
        self.hits += 1
        return data

    def _compute(self, path: Path, block: int, size: int, hook_module: str, optimize: Optimize) -> dict:
        log.info("z block %d (%d facts) at %s: computing", block, size, hook_module)
        values, loss = optimize(self.pool[block * size : (block + 1) * size])
        data = {"values": values.detach().cpu().contiguous(), "loss": loss.detach().cpu().contiguous()}
        save_tensors(path, data, {"module": hook_module, "block": str(block), "size": str(size)})
        self.misses += 1
        return data


@contextlib.contextmanager
def _block_lock(path: Path, wait: bool) -> Iterator[bool]:
    """An exclusive lock on `path`'s lock file; yields False when `wait` is off and another
    process holds it. Where the file system cannot lock, every job computes for itself."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError:
            yield True
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
