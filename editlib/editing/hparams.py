"""The hyperparameters every locate-and-edit method reads (torch-free).

`LocateEditHparams` holds what the shared engine (editlib.editing.editor.Editor) reads for any of
ROME, r-ROME, MEMIT, EMMET and AlphaEdit: the edited layers, the target optimisation and the
context templates. Each method subclasses it in its own module (editlib/methods/<method>.py) with
the values only it reads, its defaults (docs/methods.md §11) and how the engine applies it; a key
the method does not read is rejected with the method's name (`from_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

# Context templates (docs/methods.md §3): (length, count) pairs of sampled prefixes
MEMIT_LENGTHS = ((10, 5),)
ROME_LENGTHS = ((5, 10), (10, 10))


def check_ranges(owner: str, values: Any, counts: tuple[str, ...] = (), positive: tuple[str, ...] = (),
                 non_negative: tuple[str, ...] = (), fractions: tuple[str, ...] = ()) -> None:
    """Raise ValueError naming the first field of `values` (a dataclass) out of its range: `counts`
    integers >= 1, `positive` numbers > 0, `non_negative` numbers >= 0, `fractions` in [0, 1]."""
    for name in counts:
        value = getattr(values, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value!r}")
    for name in positive:
        if not getattr(values, name) > 0:
            raise ValueError(f"{owner}: {name} must be > 0, got {getattr(values, name)!r}")
    for name in non_negative:
        if not getattr(values, name) >= 0:
            raise ValueError(f"{owner}: {name} must be >= 0, got {getattr(values, name)!r}")
    for name in fractions:
        if not 0 <= getattr(values, name) <= 1:
            raise ValueError(f"{owner}: {name} must be in [0, 1], got {getattr(values, name)!r}")


def unknown_keys_error(owner: str, given: Any, known: Any, what: str = "hyperparameter") -> ValueError | None:
    """The error for keys of `given` that `owner` does not read (None when all are known)."""
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return None
    return ValueError(f"{owner} does not read the {what}{'s' if len(unknown) > 1 else ''} "
                      f"{', '.join(repr(key) for key in unknown)}; it reads {sorted(known)}")


@dataclass(frozen=True)
class TargetHparams:
    """Hyperparameters of the target optimisation (the names of the published hyperparameter files)."""

    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    kl_prompt: str = "{} is a"
    facts_per_chunk: int = 32
    cache_prefix: bool = True

    def __post_init__(self):
        check_ranges("targets", self, counts=("v_num_grad_steps", "facts_per_chunk"),
                     positive=("v_lr", "clamp_norm_factor"),
                     non_negative=("v_weight_decay", "kl_factor", "early_stop_loss"))


@dataclass(frozen=True)
class LocateEditHparams:
    """What the engine reads for every locate-and-edit method. Subclasses set `method` and add theirs.

    How the engine applies a method is part of its class: `one_fact_at_a_time` (ROME and r-ROME:
    each fact a rank-one update at one layer, on the weights the previous fact left) or else the
    residual spread over `layers` with the method's `directions`.
    """

    method: ClassVar[str] = ""
    one_fact_at_a_time: ClassVar[bool] = False

    layers: tuple[int, ...]
    targets: TargetHparams = TargetHparams()
    context_lengths: tuple[tuple[int, int], ...] = MEMIT_LENGTHS
    template_seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "context_lengths", tuple(tuple(pair) for pair in self.context_lengths))
        if not self.layers:
            raise ValueError(f"{self.method}: 'layers' is empty")
        if self.one_fact_at_a_time and len(self.layers) != 1:
            raise ValueError(f"{self.method} edits exactly one layer, got layers={list(self.layers)}")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"{self.method}: layers must be strictly increasing, got {list(self.layers)}")
        check_ranges(self.method, self, non_negative=("template_seed",))
        for length, count in self.context_lengths:
            if length < 1 or count < 0:
                raise ValueError(f"{self.method}: context_lengths: each (length, count) needs length >= 1 and "
                                 f"count >= 0, got {[list(pair) for pair in self.context_lengths]}")

    @property
    def needs_statistics(self) -> bool:
        """Whether the edit reads C = E[k k^T] of its layers."""
        return True

    def directions(self, editor, layer: int, keys, independent: bool):
        """Update directions B (d_k, N) for `keys` (d_k, N) at `layer` (editlib.editing.updates)."""
        raise NotImplementedError(f"{self.method} edits one fact at a time; it has no spread directions")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_config(cls, values: dict[str, Any]) -> LocateEditHparams:
        """The method's defaults overridden by `values` (a config block: `targets` a nested dict);
        raises ValueError naming the method and any key it does not read."""
        values = {key: value for key, value in values.items() if value is not None}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        error = unknown_keys_error(cls.method, values, fields)
        if error:
            raise error
        targets = values.pop("targets", {})
        if isinstance(targets, dict):
            target_fields = [f.name for f in dataclasses.fields(TargetHparams)]
            error = unknown_keys_error(f"{cls.method}: targets", targets, target_fields, "target hyperparameter")
            if error:
                raise error
            targets = dataclasses.replace(fields["targets"].default, **targets)
        values.setdefault("layers", ())
        return cls(targets=targets, **values)
