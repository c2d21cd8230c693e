"""GRACE (Hartvigsen et al. 2023; docs/methods.md §5.6): a codebook adaptor on one layer's MLP
output projection; the base weights never change. This module is torch-free (the hyperparameter
class and the registry entry); the adaptor and its session are in session.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from editlib.editing.hparams import check_ranges, unknown_keys_error
from editlib.methods.registry import Method, register

REPLACEMENTS = ("replace_last", "replace_prompt", "replace_all")


@dataclass(frozen=True)
class GraceHparams:
    """GRACE hyperparameters; defaults as docs/methods.md §11 (EasyEdit's Llama-2 file: n_iter 50,
    replace_last). `layers`: the one layer whose MLP output projection the codebook wraps (the
    workflow sets it; the adaptor alone, GraceEditor, takes a module name instead)."""

    method: ClassVar[str] = "grace"

    layers: tuple[int, ...] = ()
    eps: float = 1.0  # initial radius of a new key
    edit_lr: float = 1.0  # Adam learning rate on the values
    n_iter: int = 50  # Adam steps per edit
    replacement: Literal["replace_last", "replace_prompt", "replace_all"] = "replace_last"
    val_init: Literal["cold", "warm"] = "cold"  # cold: uniform [0, 1); warm: the module's current output
    dist: Literal["euc"] = "euc"
    eps_expand: Literal["coverage"] = "coverage"
    seed: int = 0  # seeds the cold value initialisation

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if len(self.layers) > 1:
            raise ValueError(f"grace wraps one layer, got layers={list(self.layers)}")
        if self.replacement not in REPLACEMENTS:
            raise ValueError(f"grace: replacement must be one of {REPLACEMENTS}, got {self.replacement!r}")
        if self.val_init not in ("cold", "warm"):
            raise ValueError(f"grace: val_init must be 'cold' or 'warm', got {self.val_init!r}")
        if self.dist != "euc" or self.eps_expand != "coverage":
            raise ValueError("grace: only dist='euc' and eps_expand='coverage' are implemented")
        check_ranges("grace", self, counts=("n_iter",), positive=("eps", "edit_lr"), non_negative=("seed",))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_config(cls, values: dict[str, Any]) -> GraceHparams:
        """Defaults overridden by `values`; raises ValueError naming any key GRACE does not read."""
        error = unknown_keys_error(cls.method, values, [f.name for f in dataclasses.fields(cls)])
        if error:
            raise error
        return cls(**values)


def _open_session(ctx, spec: GraceHparams):
    from editlib.methods.grace.session import GraceSession

    return GraceSession(ctx.model, ctx.tokenizer, spec)


register(Method(
    name="grace",
    spec=lambda hyperparameters, layers, _: GraceHparams.from_config({**hyperparameters, "layers": layers}),
    open=_open_session,
    writes_mlp=False,  # wraps the module whatever its weights
    downstream_equal_length_batches=True,  # the codebook reads each sequence's last token: no padding after it
    downstream_shares_contexts=False,  # ... so a continuation run over a cached context would read another token
))
