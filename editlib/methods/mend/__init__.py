"""MEND (Mitchell et al. 2022; docs/methods.md §5.7): a trained hypernetwork turns an edit's
gradient into a weight update. This module is torch-free (the training hyperparameters, the edit's
spec and the registry entry); the hypernetwork, its training and its session are in editor.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from editlib.editing.hparams import check_ranges, unknown_keys_error
from editlib.methods.registry import Method, register


@dataclass(frozen=True)
class MendHparams:
    """MEND's training hyperparameters (the config's `methods.mend.hparams`). Defaults follow the
    reference configs (rank 1920, n_hidden 1, edit_lr 1e-4, lr 1e-6, lr_lr 1e-4, c_edit 0.1,
    c_loc 1.0, grad_clip 100), which are tuned for billion-parameter models and ~100k outer steps;
    tiny CPU models need larger lr and lr_lr."""

    method: ClassVar[str] = "mend"

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

    @classmethod
    def from_config(cls, values: dict[str, Any]) -> MendHparams:
        """Defaults overridden by `values`; raises ValueError naming any key MEND's training does not read."""
        error = unknown_keys_error("mend: hparams", values, [f.name for f in dataclasses.fields(cls)])
        if error:
            raise error
        return cls(**values)


@dataclass(frozen=True)
class MendSpec:
    """A MEND edit: the hypernetwork saved at `checkpoint` (train_mend, then MendEditor.save)."""

    method: ClassVar[str] = "mend"

    checkpoint: str
    layers: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


def _spec(hyperparameters: dict, layers: tuple[int, ...], trained_editor: str | None) -> MendSpec:
    if hyperparameters:
        raise ValueError(f"mend does not read {sorted(hyperparameters)}: its edit has no hyperparameters of its own; "
                         "its training settings go under n_train, n_eval and hparams")
    return MendSpec(checkpoint=str(trained_editor))


def _open_session(ctx, spec: MendSpec):
    from editlib.methods.mend.editor import MendSession

    return MendSession(ctx.model, ctx.tokenizer, spec)


register(Method(name="mend", spec=_spec, open=_open_session, chooses_layers=False, trained_editor=True))
