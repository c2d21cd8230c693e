"""ROME and r-ROME (Meng et al. 2022; Gupta et al. 2024, "Rebuilding ROME"): one rank-one update
per fact at one layer's MLP, fact after fact (docs/methods.md §5.1-5.2). Torch-free: the update
rule is editlib.editing.updates.rome_directions, applied by editlib.editing.editor.Editor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from editlib.editing.hparams import ROME_LENGTHS, LocateEditHparams, TargetHparams
from editlib.methods.registry import locate_and_edit_method, register


@dataclass(frozen=True)
class RomeHparams(LocateEditHparams):
    """ROME: the update's denominator key is the edit prompt's own key (the reference's asymmetry)."""

    method: ClassVar[str] = "rome"
    one_fact_at_a_time: ClassVar[bool] = True
    # r-ROME: the denominator uses the template-averaged key, as the numerator does
    averaged_denominator_key: ClassVar[bool] = False

    targets: TargetHparams = TargetHparams(v_num_grad_steps=20, clamp_norm_factor=4.0)
    context_lengths: tuple[tuple[int, int], ...] = ROME_LENGTHS
    mom2_adjustment: bool = True  # C^-1 k as the update direction (False: k itself)

    @property
    def needs_statistics(self) -> bool:
        return self.mom2_adjustment


@dataclass(frozen=True)
class RRomeHparams(RomeHparams):
    """r-ROME: ROME with the template-averaged key in the denominator as well."""

    method: ClassVar[str] = "r-rome"
    averaged_denominator_key: ClassVar[bool] = True


register(locate_and_edit_method(RomeHparams))
register(locate_and_edit_method(RRomeHparams))
