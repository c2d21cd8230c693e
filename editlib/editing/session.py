"""The editing-session protocol every method implements (docs/methods.md §12).

A session is one method's open edit of one loaded model. Experiments (editlib.study.experiments) only
ever talk to a session through these methods, so a new method needs a session class and a
registry entry (editlib.methods.registry), nothing else.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Sequence
from typing import ContextManager

import torch

from editlib.data.records import EditRequest


class EditSession(abc.ABC):
    """Batches of requests edited into a model one after another, until `restore`.

    `n_edits` counts the requests applied since the session opened or was last restored.
    """

    n_edits: int = 0
    # whether scoring may run each prompt once into a key/value cache and its targets as
    # continuations (metrics.teacher_forced); False where the edit acts on whole rows (GRACE)
    scores_prompts_once: bool = True

    @abc.abstractmethod
    def apply(self, requests: Sequence[EditRequest]) -> dict:
        """Edit `requests` into the model as one batch, on top of earlier batches; returns a report."""

    @abc.abstractmethod
    def restore(self) -> None:
        """Undo every edit: the model behaves exactly as when the session opened; n_edits is 0."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild the current edits on the unedited model (safetensors-ready)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Rebuild the edits saved by `state_dict` (on the same unedited model)."""

    def scoring(self, requests: Sequence[EditRequest]) -> ContextManager:
        """A context in which teacher-forced scoring of `requests`' prompts sees the edits as
        generation would (GRACE: query at the prompt's last token). Default: nothing to do."""
        return contextlib.nullcontext()

    def one_at_a_time(self, requests: Sequence[EditRequest]) -> Iterator[EditRequest]:
        """Yield each request while it alone is edited into the unedited model (single edits).

        The default applies and restores per request; a method that can compute all single
        edits in batched passes overrides this.
        """
        for request in requests:
            self.restore()
            self.apply([request])
            try:
                yield request
            finally:
                self.restore()

    def close(self) -> None:
        """Undo every edit and detach whatever the session attached to the model."""
        self.restore()
