"""The registry of editing methods: one entry per method, the only place the workflow, the
config schema and the experiments learn which methods exist and what each one needs.

Adding a method (docs/methods.md §12): write its session (an editlib.editing.session.EditSession)
and its hyperparameter class (a frozen dataclass with `method`, `layers` and `to_dict()`, rejecting
keys it does not read) in one module under editlib/methods/, `register(Method(...))` there, and
import the module in editlib/methods/__init__.py. The config schema's method names, the workflow's
inputs and wildcards, config validation and every experiment follow from the entry.
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

    spec(hyperparameters, layers, trained_editor) -> the method's spec (its hyperparameter class),
        built from its config block (minus `layers` and training keys), the layers to edit and, for
        a method with `trained_editor`, the path of its trained editor; raises ValueError on a bad
        value or a key the method does not read.
    open(ctx, spec) -> an EditSession on ctx.model (ctx: an editlib.study.experiments.ExperimentContext
        or anything with model, tokenizer, second_moments, templates(spec), progress, target_store).
    """

    name: str
    spec: Callable[[dict, tuple[int, ...], str | None], object]
    open: Callable[[object, object], EditSession]
    uses_statistics: bool = False  # needs C = E[k k^T] of its layers (the statistics rule)
    chooses_layers: bool = True  # layers come from the config or its layer sweep ("auto")
    writes_mlp: bool = True  # writes MLP weights: layers without an MLP cannot be edited
    trained_editor: bool = False  # needs a trained hypernetwork (the train_mend rule)
    # its outputs read each row's last position, which right padding would move: downstream batches
    # hold rows of one length (editlib.eval.downstream.EqualLengthBatches)
    downstream_equal_length_batches: bool = False
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


def make_hparams(method: str, layers: Sequence[int] = (), **hyperparameters):
    """The spec of a method that needs no trained editor, from keyword values (`targets` a dict):
    ``make_hparams("memit", layers=(4, 5), mom2_update_weight=500.0)``."""
    return make_spec(method, hyperparameters, layers)


def locate_and_edit_method(hparams_class) -> Method:
    """The entry of a locate-and-edit method (editlib.editing.editor.Editor with `hparams_class`,
    a subclass of editlib.editing.hparams.LocateEditHparams)."""

    def open_editor(ctx, spec):
        from editlib.editing.editor import Editor

        return Editor.open(ctx, spec)

    return Method(
        name=hparams_class.method,
        spec=lambda hyperparameters, layers, _: hparams_class.from_config({**hyperparameters, "layers": layers}),
        open=open_editor,
        uses_statistics=True,
    )
