"""Forward hooks: capture a module's inputs or outputs, replace its output, stop the forward pass
after a module, or replay the blocks below one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from editlib.model.layout import block_index, model_layout


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing after it is needed)."""


def _tensor_of(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_tensor(output, tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


@contextlib.contextmanager
def capture_inputs(model: nn.Module, module_names: Sequence[str], stop_after: str | None = None) -> Iterator[dict]:
    """Record the (first positional) input of each named module on the next forward passes.

    Yields a dict name -> tensor (the latest pass). With `stop_after`, the forward raises
    StopForward once that module has run; callers wrap the call in `suppress(StopForward)`.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in module_names:
        module = model.get_submodule(name)

        def pre_hook(mod, args, kwargs, name=name):
            captured[name] = args[0] if args else next(iter(kwargs.values()))

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        with stop_forward_after(model, stop_after):
            yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def stop_forward_after(model: nn.Module, module_name: str | None) -> Iterator[None]:
    """Make forward passes raise StopForward once `module_name` has run (None: no stop).

    Enter it after any other hooks on the same module, so theirs run first.
    """
    if module_name is None:
        yield
        return

    def stop_hook(mod, args, output):
        raise StopForward

    handle = model.get_submodule(module_name).register_forward_hook(stop_hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_outputs(model: nn.Module, module_names: Sequence[str]) -> Iterator[dict]:
    """Record the output tensor of each named module on the next forward passes."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in module_names:
        def hook(mod, args, output, name=name):
            captured[name] = _tensor_of(output)

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def edit_output(model: nn.Module, module_name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace a module's output tensor by fn(output) during forward passes (tuple or tensor)."""

    def hook(mod, args, output):
        return _replace_tensor(output, fn(_tensor_of(output)))

    handle = model.get_submodule(module_name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def replay_blocks_below(model: nn.Module, module_name: str) -> Iterator[None]:
    """Run the blocks below the one holding `module_name` once, then replay their outputs.

    The first forward pass in the context records every lower block's output; later passes return
    the recorded outputs without computing them. Valid only when every pass has the same inputs
    and nothing below that block changes between passes, as in target optimisation, where the
    optimised vector enters at `module_name` and the prompts are fixed.
    """
    blocks = [model.get_submodule(model_layout(model).block(i)) for i in range(block_index(model, module_name))]
    recorded: dict[int, object] = {}
    handles = []

    def record(index: int):
        def hook(module, args, output):
            recorded[index] = output
            if index == len(blocks) - 1:  # every lower block is recorded: replay from the next pass on
                for i, block in enumerate(blocks):
                    block.forward = lambda *args, _i=i, **kwargs: recorded[_i]
                for handle in handles:
                    handle.remove()
        return hook

    try:
        handles = [block.register_forward_hook(record(i)) for i, block in enumerate(blocks)]
        yield
    finally:
        for handle in handles:
            handle.remove()
        for block in blocks:
            block.__dict__.pop("forward", None)


def run_until(model: nn.Module, stop_after: str | None, **inputs) -> None:
    """Forward pass that stops after module `stop_after` (use inside capture contexts)."""
    with stop_forward_after(model, stop_after), contextlib.suppress(StopForward):
        model(**inputs)
