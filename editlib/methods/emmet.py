"""EMMET (Gupta et al. 2024): MEMIT's memory terms with the batch's edits as equality constraints
(docs/methods.md §5.4). Torch-free: the rule is editlib.editing.updates.emmet_directions, applied
by editlib.editing.editor.Editor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from editlib.editing.hparams import LocateEditHparams, check_ranges
from editlib.methods.registry import locate_and_edit_method, register


@dataclass(frozen=True)
class EmmetHparams(LocateEditHparams):
    method: ClassVar[str] = "emmet"

    mom2_update_weight: float = 10000.0  # C~ = mom2_update_weight C + update_norm_lambda I
    emmet_lambda: float = 0.1  # ridge on K^T C~^-1 K when a batch has more than one edit
    update_norm_lambda: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_ranges(self.method, self, positive=("mom2_update_weight",),
                     non_negative=("emmet_lambda", "update_norm_lambda"))

    def directions(self, editor, layer: int, keys, independent: bool):
        from editlib.editing.updates import emmet_directions

        return emmet_directions(keys, editor.covariances[layer], self.mom2_update_weight, self.emmet_lambda,
                                self.update_norm_lambda, independent)


register(locate_and_edit_method(EmmetHparams))
