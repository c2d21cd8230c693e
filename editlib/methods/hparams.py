"""Hyperparameters as typed dataclasses, one home for all of them: the locate-and-edit methods'
(method defaults, docs/methods.md §11, plus overrides) and their target optimisation, GRACE, MEND
and its training, and the toy model's training. Plain data with checks, no torch: the workflow
validates a config against them before any job starts."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, Literal

# Context templates (docs/methods.md §3): (length, count) pairs of sampled prefixes
MEMIT_LENGTHS = ((10, 5),)
ROME_LENGTHS = ((5, 10), (10, 10))

# The locate-and-edit family (editlib.editing.editor.Editor); each is registered in editlib.methods.registry.
LOCATE_AND_EDIT = ("rome", "r-rome", "memit", "emmet", "alphaedit")


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
        check_ranges(self.method, self, positive=("mom2_update_weight", "nullspace_threshold"),
                     non_negative=("emmet_lambda", "update_norm_lambda", "l2", "template_seed"))
        for length, count in self.context_lengths:
            if length < 1 or count < 0:
                raise ValueError(f"{self.method}: context_lengths: each (length, count) needs length >= 1 and "
                                 f"count >= 0, got {[list(pair) for pair in self.context_lengths]}")

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


# ---------------------------------------------------------------------------- GRACE

REPLACEMENTS = ("replace_last", "replace_prompt", "replace_all")


@dataclass(frozen=True)
class GraceHparams:
    """GRACE hyperparameters; defaults as docs/methods.md §11 (EasyEdit's Llama-2 file: n_iter 50, replace_last)."""

    eps: float = 1.0  # initial radius of a new key
    edit_lr: float = 1.0  # Adam learning rate on the values
    n_iter: int = 50  # Adam steps per edit
    replacement: Literal["replace_last", "replace_prompt", "replace_all"] = "replace_last"
    val_init: Literal["cold", "warm"] = "cold"  # cold: uniform [0, 1); warm: the module's current output
    dist: Literal["euc"] = "euc"
    eps_expand: Literal["coverage"] = "coverage"
    seed: int = 0  # seeds the cold value initialisation

    def __post_init__(self):
        if self.replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {self.replacement!r}")
        if self.val_init not in ("cold", "warm"):
            raise ValueError(f"val_init must be 'cold' or 'warm', got {self.val_init!r}")
        if self.dist != "euc" or self.eps_expand != "coverage":
            raise ValueError("only dist='euc' and eps_expand='coverage' are implemented")
        check_ranges("grace", self, counts=("n_iter",), positive=("eps", "edit_lr"), non_negative=("seed",))


@dataclass(frozen=True)
class GraceSpec:
    """GRACE on the edited module (the MLP's output projection) of one layer."""

    layers: tuple[int, ...]
    hparams: GraceHparams = GraceHparams()
    method: str = "grace"

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------- MEND


@dataclass(frozen=True)
class MendHparams:
    """MEND hyperparameters. Defaults follow the reference configs (rank 1920, n_hidden 1,
    edit_lr 1e-4, lr 1e-6, lr_lr 1e-4, c_edit 0.1, c_loc 1.0, grad_clip 100), which are tuned for
    billion-parameter models and ~100k outer steps; tiny CPU models need larger lr and lr_lr."""

    modules: tuple[str, ...] = ()  # dotted module names; () = the last n_edit_layers rewrite modules
    n_edit_layers: int = 2
    rank: int = 1920
    n_hidden: int = 1
    norm: bool = True
    edit_lr: float = 1e-4  # initial alpha
    lr: float = 1e-6  # Adam lr of the hypernetwork
    lr_lr: float = 1e-4  # Adam lr of alpha
    c_edit: float = 0.1
    c_loc: float = 1.0
    grad_clip: float = 100.0
    steps: int = 300
    batch_size: int = 4  # edits per outer step (edited jointly)
    n_locality: int = 1  # locality prompts per request
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "modules", tuple(self.modules))
        check_ranges("mend", self, counts=("n_edit_layers", "rank", "steps", "batch_size", "n_locality", "log_every"),
                     positive=("edit_lr", "lr", "lr_lr", "grad_clip"), non_negative=("n_hidden", "c_edit", "c_loc", "seed"))


@dataclass(frozen=True)
class MendSpec:
    """MEND with the hypernetwork saved at `checkpoint` (train_mend, then MendEditor.save)."""

    checkpoint: str
    layers: tuple[int, ...] = ()
    method: str = "mend"

    def to_dict(self) -> dict:
        return asdict(self)
