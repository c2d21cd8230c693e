"""MEMIT (Meng et al. 2023): target residuals spread over several layers, each layer's update a
least-squares solve against the unedited keys' second moment (docs/methods.md §5.3). Torch-free:
the rule is editlib.editing.updates.memit_directions, applied by editlib.editing.editor.Editor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from editlib.editing.hparams import LocateEditHparams, check_ranges
from editlib.methods.registry import locate_and_edit_method, register


@dataclass(frozen=True)
class MemitHparams(LocateEditHparams):
    method: ClassVar[str] = "memit"

    mom2_update_weight: float = 15000.0  # weight of C against the batch's keys: (mom2_update_weight C + K K^T)^-1 K

    def __post_init__(self):
        super().__post_init__()
        check_ranges(self.method, self, positive=("mom2_update_weight",))

    def directions(self, editor, layer: int, keys, independent: bool):
        from editlib.editing.updates import memit_directions

        return memit_directions(keys, editor.covariances[layer], self.mom2_update_weight, independent)


register(locate_and_edit_method(MemitHparams))
