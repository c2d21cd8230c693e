"""AlphaEdit (Fang et al. 2025): MEMIT's spread with each update projected onto the null space of
the unedited keys' second moment, and the keys of earlier edits kept in the solve (docs/methods.md
§5.5). Torch-free: the rule is editlib.editing.updates.alphaedit_directions, applied by
editlib.editing.editor.Editor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from editlib.editing.hparams import LocateEditHparams, TargetHparams, check_ranges
from editlib.methods.registry import locate_and_edit_method, register


@dataclass(frozen=True)
class AlphaEditHparams(LocateEditHparams):
    method: ClassVar[str] = "alphaedit"
    keeps_edited_keys: ClassVar[bool] = True  # the engine accumulates K K^T of every applied batch

    targets: TargetHparams = TargetHparams(v_lr=0.1)
    nullspace_threshold: float = 2e-2  # eigenvalues of C below this span the preserved null space
    l2: float = 10.0  # ridge of the projected solve

    def __post_init__(self):
        super().__post_init__()
        check_ranges(self.method, self, positive=("nullspace_threshold",), non_negative=("l2",))

    def directions(self, editor, layer: int, keys, independent: bool):
        from editlib.editing.updates import alphaedit_directions

        return alphaedit_directions(keys, editor.projector(layer, self.nullspace_threshold),
                                    editor.key_products[layer], self.l2, independent)


register(locate_and_edit_method(AlphaEditHparams))
