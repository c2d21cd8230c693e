"""Editing hyperparameters as typed dataclasses: method defaults (docs/methods.md §11) plus overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .templates import MEMIT_LENGTHS, ROME_LENGTHS
from .values import TargetHparams

# The locate-and-edit family (editlib.editing.Editor); each is registered in editlib.methods.
LOCATE_AND_EDIT = ("rome", "r-rome", "memit", "emmet", "alphaedit")


@dataclass(frozen=True)
class EditHparams:
    """Everything that determines an edit (and enters cache keys)."""

    method: str
    layers: tuple[int, ...]
    targets: TargetHparams = TargetHparams()
    mom2_update_weight: float = 15000.0
    emmet_lambda: float = 0.1
    update_norm_lambda: float = 0.0
    nullspace_threshold: float = 2e-2
    l2: float = 10.0
    mom2_adjustment: bool = True
    context_lengths: tuple[tuple[int, int], ...] = MEMIT_LENGTHS
    template_seed: int = 0

    def __post_init__(self):
        if self.method not in LOCATE_AND_EDIT:
            raise ValueError(f"unknown method {self.method!r}; expected one of {LOCATE_AND_EDIT}")
        if not self.layers:
            raise ValueError(f"{self.method}: 'layers' is empty")
        if self.is_rome and len(self.layers) != 1:
            raise ValueError(f"{self.method} edits exactly one layer, got layers={list(self.layers)}")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be strictly increasing, got {list(self.layers)}")

    @property
    def is_rome(self) -> bool:
        return self.method in ("rome", "r-rome")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Method defaults (docs/methods.md §11: original MEMIT/ROME on GPT-J, UME EMMET, AlphaEdit Llama3-8B).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "memit": {"mom2_update_weight": 15000.0},
    "emmet": {"mom2_update_weight": 10000.0, "emmet_lambda": 0.1},
    "alphaedit": {"targets": {"v_lr": 0.1}, "nullspace_threshold": 2e-2, "l2": 10.0},
    "rome": {
        "targets": {"v_num_grad_steps": 20, "clamp_norm_factor": 4.0},
        "mom2_adjustment": True,
        "context_lengths": ROME_LENGTHS,
    },
    "r-rome": {
        "targets": {"v_num_grad_steps": 20, "clamp_norm_factor": 4.0},
        "mom2_adjustment": True,
        "context_lengths": ROME_LENGTHS,
    },
}


def deep_merge(base: dict, override: dict) -> dict:
    """`base` with `override`'s values, nested dicts merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def make_hparams(method: str, **overrides: Any) -> EditHparams:
    """Method defaults, overridden by keyword values (a nested dict for `targets`)."""
    if method not in METHOD_DEFAULTS:
        raise ValueError(f"unknown method {method!r}; expected one of {LOCATE_AND_EDIT}")
    values = deep_merge(METHOD_DEFAULTS[method], {k: v for k, v in overrides.items() if v is not None})
    target_fields = {f.name for f in dataclasses.fields(TargetHparams)}
    targets = values.pop("targets", {})
    unknown = set(targets) - target_fields
    if unknown:
        raise ValueError(f"{method}: unknown target hyperparameters {sorted(unknown)}")
    known = {f.name for f in dataclasses.fields(EditHparams)} - {"method", "targets"}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{method}: unknown hyperparameters {sorted(unknown)}")
    values["layers"] = tuple(values["layers"]) if "layers" in values else ()
    if "context_lengths" in values:
        values["context_lengths"] = tuple(tuple(x) for x in values["context_lengths"])
    return EditHparams(method=method, targets=TargetHparams(**targets), **values)

