"""What every workflow job runs inside (workflow/scripts/<rule>.py): its log file, torch threads
and seeds. Imports nothing heavy, so that jobs that only read and write tables start in a second."""

from __future__ import annotations

import contextlib
import logging
import random
import sys
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("editlib.study.jobs")


@contextlib.contextmanager
def stage_logging(log_path: str | Path | None, threads: int | None = None, seed: int = 0,
                  uses_torch: bool = True) -> Iterator[None]:
    """Log (and tqdm's stderr) into `log_path`; fix torch threads and every RNG seed. Jobs that
    only read and write tables pass `uses_torch=False` and never import it."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    stream = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_path, "a", encoding="utf-8", buffering=1)
        handlers = [logging.StreamHandler(stream)]
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    random.seed(seed)
    if uses_torch:
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        torch.manual_seed(seed)
        # what decides how floats round here: a table that differs between machines starts with this line
        log.info("torch %s, CPU capability %s, %d threads", torch.__version__,
                 torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
    saved_stderr = sys.stderr
    if stream is not None:
        sys.stderr = stream
    try:
        yield
    except Exception:
        log.exception("stage failed")
        raise
    finally:
        sys.stderr = saved_stderr
        if stream is not None:
            stream.close()
