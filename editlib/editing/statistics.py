"""Second-moment statistics C = E[k k^T] of the edited module's input, over a text corpus.

One pass over the corpus serves a group of layers (all requested layers unless device memory
calls for several passes; editlib.editing.statistics_memory): a hook on each layer's edited module folds its
input into that layer's sum as the forward passes through it, and the forward stops after the
group's deepest layer. Features are accumulated in fp32 (or fp64, never TF32) on the model's
device whatever the model dtype. Each layer is cached in its own
safetensors file keyed by content (model fingerprint, module, corpus fingerprint, sample count,
max length, dtype), so a sweep over other layers reuses what exists.

C is the *mean* of k k^T over all non-pad tokens (as the reference), not the sum.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from editlib.data.corpus import Corpus
from editlib.editing.statistics_memory import statistics_memory
from editlib.io import content_key, load_tensors, save_tensors
from editlib.model.hooks import StopForward, stop_forward_after
from editlib.model.layout import ModelLayout
from editlib.model.loading import full_precision_matmul, model_fingerprint
from editlib.model.tokens import length_sorted_chunks, pad_id, pad_right

log = logging.getLogger(__name__)


class StatisticsError(RuntimeError):
    """Statistics are unusable (non-finite, or not positive definite where required)."""


@dataclass(frozen=True)
class StatsConfig:
    """How statistics are collected. `max_length` and `dtype` enter the cache key; `batch_tokens`
    changes only the batching (so the float rounding of the sums) and `layers_per_pass` only how
    many passes over the corpus collect the layers (not the result)."""

    max_length: int = 1024
    batch_tokens: int = 8192
    dtype: str = "float32"
    layers_per_pass: int | None = None


@dataclass
class SecondMoment:
    """Un-normalised sum of k k^T and the token count; `mean` is C."""

    total: torch.Tensor  # (d_k, d_k)
    count: int

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count


def collect_second_moments(
    model,
    tokenizer,
    layout: ModelLayout,
    layers: list[int],
    texts: tuple[str, ...] | list[str],
    config: StatsConfig = StatsConfig(),
    progress: bool = True,
    on_group: Callable[[dict[int, SecondMoment]], None] | None = None,
) -> dict[int, SecondMoment]:
    """k k^T summed over every non-pad token of `texts`, for every layer in `layers`.

    The layers are collected in groups of `config.layers_per_pass` (None: all in one pass on
    CPU, as many as fit on CUDA; see `layers_per_pass`), one pass over the corpus per group,
    and each group's moments (on CPU) go to `on_group` as soon as its pass ends. Each layer's
    sum depends only on its own inputs, in the same batches and order, so the result is the
    same bit for bit whatever the grouping.
    """
    if not layers:
        return {}
    device = next(model.parameters()).device
    encoded = tokenizer(list(texts), truncation=True, max_length=config.max_length)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    if not sum(lengths):
        raise StatisticsError(f"no tokens to collect statistics from ({len(lengths)} documents)")
    chunks = length_sorted_chunks(lengths, max_rows=10**9, max_tokens=config.batch_tokens)
    ordered = sorted(set(layers))
    size = layers_per_pass(model, layout, len(ordered), config)
    groups = [ordered[start : start + size] for start in range(0, len(ordered), size)]
    bar = tqdm(total=sum(lengths) * len(groups), unit="tok", desc="stats", disable=not progress)
    moments: dict[int, SecondMoment] = {}
    for group in groups:
        bar.set_description(f"stats layers {group}")
        totals, count = _accumulate_pass(model, layout, group, encoded, chunks, pad_id(tokenizer),
                                         getattr(torch, config.dtype), device, bar)
        done = {}
        for layer in group:
            done[layer] = SecondMoment(symmetric_from_upper(totals.pop(layer).cpu()), count)
            check_finite(done[layer].total, f"second moment of layer {layer}")
        moments.update(done)
        if on_group is not None:
            on_group(done)
    bar.close()
    assert len({m.count for m in moments.values()}) == 1  # every pass reads the same tokens
    return {layer: moments[layer] for layer in layers}


def _accumulate_pass(model, layout: ModelLayout, group: list[int], encoded: list[list[int]], chunks, pad: int,
                     acc_dtype: torch.dtype, device, bar) -> tuple[dict[int, torch.Tensor], int]:
    """One pass over the batches `chunks` of `encoded`: {layer: upper triangle of sum k k^T} for
    the layers in `group`, and the token count. Each layer's hook folds its input of the current
    batch into its sum as the forward passes through it, so no input outlives its layer; the
    forward stops after the group's deepest layer."""
    totals: dict[int, torch.Tensor] = {}
    batch_mask: list[torch.Tensor] = []  # the current batch's non-pad positions

    def hook_for(layer: int):
        def accumulate(module, args, kwargs):
            inputs = args[0] if args else next(iter(kwargs.values()))
            feats = inputs[batch_mask[0]].to(acc_dtype)  # (n_tok, d_k)
            if layer not in totals:
                totals[layer] = feats.new_zeros(feats.shape[1], feats.shape[1])
            with full_precision_matmul():
                accumulate_upper_gram(totals[layer], feats)

        return accumulate

    handles = [model.get_submodule(layout.rewrite(layer)).register_forward_pre_hook(hook_for(layer), with_kwargs=True)
               for layer in group]
    count = 0
    try:
        with torch.no_grad(), stop_forward_after(model, layout.rewrite(max(group))):
            for chunk in chunks:
                batch = pad_right([encoded[i] for i in chunk], pad).to(device)
                batch_mask[:] = [batch.attention_mask.bool()]
                with contextlib.suppress(StopForward):
                    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                tokens = int(batch_mask[0].sum())
                count += tokens
                bar.update(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return totals, count


def layers_per_pass(model, layout: ModelLayout, n_layers: int, config: StatsConfig) -> int:
    """How many layers one pass collects: `config.layers_per_pass` if set; else all `n_layers`
    on CPU (or MPS), and on CUDA as many as `statistics_memory` fits in the device's memory
    (its free memory plus what this process holds, the loaded model included)."""
    device = next(model.parameters()).device
    available = device_memory_available(device) if config.layers_per_pass is None else None
    model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if t.device == device)
    module = model.get_submodule(layout.rewrite(0))  # the edited module: d_k is its input width
    d_k = module.weight.shape[1] if isinstance(module, torch.nn.Linear) else module.weight.shape[0]  # GPT-2's Conv1D: (in, out)
    plan = statistics_memory(
        intermediate_size=d_k, hidden_size=model.config.hidden_size, n_layers=n_layers, batch_tokens=config.batch_tokens,
        model_bytes=model_bytes, model_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        acc_dtype=config.dtype, available_bytes=available, layers_per_pass=config.layers_per_pass,
    )
    if available is not None:
        log.info("statistics: %d of %d layers per pass (%d passes): peak %.1f GiB of %.1f GiB available "
                 "(model %.1f, %.2f per layer's Gram, capture %.2f, activations %.2f)", plan.group_size, n_layers,
                 plan.passes, plan.peak_bytes / 2**30, available / 2**30, plan.model_bytes / 2**30,
                 plan.gram_bytes / 2**30, plan.capture_bytes / 2**30, plan.activation_bytes / 2**30)
        if plan.peak_bytes > available:
            log.warning("statistics: even one layer per pass needs %.1f GiB, %.1f GiB available; lower "
                        "stats.batch_tokens", plan.peak_bytes / 2**30, available / 2**30)
    return plan.group_size


def device_memory_available(device: torch.device) -> int | None:
    """Bytes of CUDA memory this process may use (free plus what it already holds, the loaded
    model included); None on other devices (no per-pass limit)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


def accumulate_upper_gram(total: torch.Tensor, feats: torch.Tensor) -> None:
    """total += feats^T feats on and above the diagonal (below it: not maintained), in row blocks.

    k k^T is symmetric, so with 8 row blocks the GEMMs do 9/16 of the full product's work.
    """
    width = feats.shape[1]
    step = -(-width // min(8, max(1, width // 128)))
    for start in range(0, width, step):
        total[start : start + step, start:].addmm_(feats[:, start : start + step].T, feats[:, start:])


def symmetric_from_upper(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (with the diagonal) is `upper`'s."""
    return torch.triu(upper) + torch.triu(upper, diagonal=1).T


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise StatisticsError if `tensor` holds NaN or Inf."""
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise StatisticsError(f"{what} has {bad} non-finite entries (NaN/Inf); check the model dtype and inputs")


def stats_key(fingerprint: str, module: str, corpus: Corpus, config: StatsConfig) -> str:
    """Content key of one layer's statistics."""
    return content_key(
        {
            "model": fingerprint,
            "module": module,
            "corpus": corpus.fingerprint,
            "n_docs": len(corpus.texts),
            "max_length": config.max_length,
            "dtype": config.dtype,
        }
    )


def stats_path(cache_dir: str | Path, module: str, key: str) -> Path:
    return Path(cache_dir) / f"{module}.{key}.safetensors"


def save_second_moment(path: Path, moment: SecondMoment, key: str) -> None:
    """Atomically write one layer's statistics with its key in the metadata."""
    save_tensors(path, {"total": moment.total}, {"key": key, "count": str(moment.count)})


def load_second_moment(path: Path, key: str) -> SecondMoment | None:
    """Read cached statistics; None (and a warning) if absent, corrupt or keyed differently."""
    if not path.exists():
        return None
    try:
        tensors, metadata = load_tensors(path)
        moment = SecondMoment(tensors["total"], int(metadata["count"]))
        if metadata.get("key") != key:
            raise ValueError(f"key {metadata.get('key')} != {key}")
        check_finite(moment.total, str(path))
    except (SafetensorError, OSError, KeyError, ValueError, StatisticsError, json.JSONDecodeError) as err:
        log.warning("ignoring unusable statistics cache %s (%s); recomputing", path, err)
        return None
    return moment


def layer_second_moments(
    model,
    tokenizer,
    layout: ModelLayout,
    layers: list[int],
    corpus: Corpus,
    cache_dir: str | Path,
    config: StatsConfig = StatsConfig(),
    progress: bool = True,
) -> dict[int, SecondMoment]:
    """Statistics for `layers`, from cache where valid; the missing ones collected together
    (collect_second_moments), each group's cache files written as soon as its pass ends."""
    fingerprint = model_fingerprint(model)
    keys = {layer: stats_key(fingerprint, layout.rewrite(layer), corpus, config) for layer in layers}
    paths = {layer: stats_path(cache_dir, layout.rewrite(layer), keys[layer]) for layer in layers}
    result: dict[int, SecondMoment] = {}
    for layer in layers:
        cached = load_second_moment(paths[layer], keys[layer])
        if cached is not None:
            result[layer] = cached
    missing = [layer for layer in layers if layer not in result]
    if missing:
        def save_group(moments: dict[int, SecondMoment]) -> None:  # a later pass's failure keeps these
            for layer, moment in moments.items():
                save_second_moment(paths[layer], moment, keys[layer])

        result.update(collect_second_moments(model, tokenizer, layout, missing, corpus.texts, config, progress,
                                             on_group=save_group))
    return {layer: result[layer] for layer in layers}


def save_moments(path: str | Path, moments: dict[int, SecondMoment], metadata: dict[str, str] | None = None) -> None:
    """Atomically write C (the mean) of several layers into one safetensors file ("layer.<l>")."""
    tensors = {f"layer.{layer}": moment.mean.float().contiguous() for layer, moment in moments.items()}
    meta = {"counts": json.dumps({str(layer): m.count for layer, m in moments.items()}), **(metadata or {})}
    save_tensors(path, tensors, meta)


def load_moments(path: str | Path, layers=None) -> dict[int, torch.Tensor]:
    """Read a file written by `save_moments`: {layer: C} for every layer in it, or for `layers`
    only (the other layers' tensors are not read). A requested layer the file lacks raises
    ValueError; an unreadable file editlib.io.ArtifactError; non-finite values StatisticsError."""
    names = None if layers is None else {f"layer.{layer}" for layer in layers}
    tensors, _ = load_tensors(path, names=names, rule="statistics")
    moments = {int(name.split(".", 1)[1]): tensor for name, tensor in tensors.items() if name.startswith("layer.")}
    if layers is not None and (missing := sorted(set(layers) - set(moments))):
        present = sorted(int(name.split(".", 1)[1]) for name in _tensor_names(path) if name.startswith("layer."))
        raise ValueError(f"{path}: no statistics for layers {missing} (it holds layers {present}); the statistics "
                         "rule collects the layers of experiments.layer_sweep.layers and of explicit methods.<m>.layers")
    for layer, tensor in moments.items():
        check_finite(tensor, f"{path}: layer {layer}")
    return moments


def _tensor_names(path: str | Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())
