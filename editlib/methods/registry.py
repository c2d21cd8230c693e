"""The registry of editing methods: one entry per method, the only place the workflow, the
config schema and the experiments learn which methods exist and what each one needs.

Adding a method (docs/methods.md §12): write its session (an editlib.editing.session.EditSession) and a
spec (a frozen dataclass with `method`, `layers` and `to_dict()`) in one module, then
`register(Method(...))` here. The config schema's method names, the workflow's inputs and
wildcards, config validation and every experiment follow from the entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the sessions import torch; the registry itself does not (config checks read it)
    from editlib.editing.session import EditSession


@dataclass(frozen=True)
class Method:
    """What the workflow needs to know about one editing method.

    spec(hyperparameters, layers, trained_editor) -> the method's spec, built from its config
        block (minus `layers` and training keys), the layers to edit and, for a method with
        `trained_editor`, the path of its trained editor; raises ValueError on a bad value.
    open(ctx, spec) -> an EditSession on ctx.model (ctx: an editlib.study.experiments.ExperimentContext).
    """

    name: str
    spec: Callable[[dict, tuple[int, ...], str | None], object]
    open: Callable[[object, object], EditSession]
    uses_statistics: bool = False  # needs C = E[k k^T] of its layers (the statistics rule)
    chooses_layers: bool = True  # layers come from the config or its layer sweep ("auto")
    writes_mlp: bool = True  # writes MLP weights: layers without an MLP cannot be edited
    trained_editor: bool = False  # needs the hypernetwork of the train_mend rule
    downstream_batch_size: int | None = None  # lm-eval batch size it requires (None: the config's)
    # its outputs at a position depend on the tokens up to it only, so downstream scoring may run
    # each context once for all its continuations (editlib.eval.downstream.shared_context_lm_class)
    downstream_shares_contexts: bool = True


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to the registry (a name may be registered once)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registry entry of `name`."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {method_names()}") from None


def method_names() -> list[str]:
    """Every registered method, in registration order."""
    return list(METHODS)


def make_spec(name: str, hyperparameters: dict, layers: Sequence[int] = (), trained_editor: str | None = None):
    """The spec of method `name` (see Method.spec)."""
    return get_method(name).spec(dict(hyperparameters), tuple(layers), trained_editor)


# ---------------------------------------------------------------------------- the built-in methods


def _locate_and_edit(name: str) -> Method:
    """ROME, r-ROME, MEMIT, EMMET, AlphaEdit: editlib.editing.editor.Editor with EditHparams."""
    from editlib.methods.hparams import make_hparams

    def open_editor(ctx, spec):
        from editlib.editing.editor import Editor

        return Editor.open(ctx, spec)

    return Method(
        name=name,
        spec=lambda hyperparameters, layers, _: make_hparams(name, **{**hyperparameters, "layers": layers}),
        open=open_editor,
        uses_statistics=True,
    )


def _grace() -> Method:
    from editlib.methods.hparams import GraceHparams, GraceSpec

    def open_session(ctx, spec):
        from editlib.methods.grace import GraceSession

        return GraceSession(ctx.model, ctx.tokenizer, spec)

    return Method(
        name="grace",
        spec=lambda hyperparameters, layers, _: GraceSpec(layers=layers, hparams=GraceHparams(**hyperparameters)),
        open=open_session,
        writes_mlp=False,  # wraps the module whatever its weights
        downstream_batch_size=1,  # the codebook reads each sequence's last token: one sequence per batch
        downstream_shares_contexts=False,  # ... so a continuation run over a cached context would read another token
    )


def _mend() -> Method:
    from editlib.methods.hparams import MendSpec

    def spec(hyperparameters: dict, layers: tuple[int, ...], trained_editor: str | None) -> MendSpec:
        if hyperparameters:
            raise ValueError(f"MEND's edit has no hyperparameters of its own (got {sorted(hyperparameters)}); "
                             "its training settings go under n_train, n_eval and hparams")
        return MendSpec(checkpoint=str(trained_editor))

    def open_session(ctx, spec):
        from editlib.methods.mend import MendSession

        return MendSession(ctx.model, ctx.tokenizer, spec)

    return Method(name="mend", spec=spec, open=open_session,
                  chooses_layers=False, trained_editor=True)


def _register_builtins() -> None:
    from editlib.methods.hparams import LOCATE_AND_EDIT

    for name in LOCATE_AND_EDIT:
        register(_locate_and_edit(name))
    register(_grace())
    register(_mend())


_register_builtins()
