"""Second-moment statistics C = E[k k^T] of the edited module's input, over a text corpus.

One pass over the corpus serves every requested layer: hooks read the input of each layer's
edited module and the forward stops after the deepest one. Features are accumulated in fp32
(or fp64) on the model's device whatever the model dtype. Each layer is cached in its own
safetensors file keyed by content (model fingerprint, module, corpus fingerprint, sample count,
max length, dtype), so a sweep over other layers reuses what exists.

C is the *mean* of k k^T over all non-pad tokens (as the reference), not the sum.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from .corpus import Corpus
from .io import content_key, load_tensors, save_tensors
from .models import ModelLayout, StopForward, capture_inputs, model_fingerprint
from .tokens import length_sorted_chunks, pad_right, pad_id

log = logging.getLogger(__name__)


class StatisticsError(RuntimeError):
    """Statistics are unusable (non-finite, or not positive definite where required)."""


@dataclass(frozen=True)
class StatsConfig:
    """How statistics are collected (all fields enter the cache key)."""

    max_length: int = 1024
    batch_tokens: int = 8192
    dtype: str = "float32"


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
) -> dict[int, SecondMoment]:
    """One pass over `texts` accumulating k k^T for every layer in `layers`."""
    if not layers:
        return {}
    device = next(model.parameters()).device
    acc_dtype = getattr(torch, config.dtype)
    names = {layer: layout.rewrite(layer) for layer in layers}
    deepest = names[max(layers)]
    encoded = tokenizer(list(texts), truncation=True, max_length=config.max_length)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    chunks = length_sorted_chunks(lengths, max_rows=10**9, max_tokens=config.batch_tokens)
    totals = {layer: None for layer in layers}
    count = 0
    bar = tqdm(total=sum(lengths), unit="tok", desc=f"stats layers {layers}", disable=not progress)
    with torch.no_grad(), capture_inputs(model, list(names.values()), stop_after=deepest) as captured:
        for chunk in chunks:
            batch = pad_right([encoded[i] for i in chunk], pad_id(tokenizer)).to(device)
            with contextlib.suppress(StopForward):
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            mask = batch.attention_mask.bool()
            for layer, name in names.items():
                feats = captured[name][mask].to(acc_dtype)  # (n_tok, d_k)
                if totals[layer] is None:
                    totals[layer] = feats.new_zeros(feats.shape[1], feats.shape[1])
                accumulate_upper_gram(totals[layer], feats)
            count += int(mask.sum())
            bar.update(int(mask.sum()))
    bar.close()
    result = {layer: SecondMoment(symmetric_from_upper(totals[layer]).cpu(), count) for layer in layers}
    for layer, moment in result.items():
        check_finite(moment.total, f"second moment of layer {layer}")
    return result


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
    """Statistics for `layers`, from cache where valid; missing layers computed in ONE pass."""
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
        computed = collect_second_moments(model, tokenizer, layout, missing, corpus.texts, config, progress)
        for layer, moment in computed.items():
            save_second_moment(paths[layer], moment, keys[layer])
            result[layer] = moment
    return result


def save_moments(path: str | Path, moments: dict[int, SecondMoment], metadata: dict[str, str] | None = None) -> None:
    """Atomically write C (the mean) of several layers into one safetensors file ("layer.<l>")."""
    tensors = {f"layer.{layer}": moment.mean.float().contiguous() for layer, moment in moments.items()}
    meta = {"counts": json.dumps({str(layer): m.count for layer, m in moments.items()}), **(metadata or {})}
    save_tensors(path, tensors, meta)


def load_moments(path: str | Path) -> dict[int, torch.Tensor]:
    """Read a file written by `save_moments`: {layer: C}; non-finite values raise StatisticsError."""
    tensors, _ = load_tensors(path)
    moments = {int(name.split(".", 1)[1]): tensor for name, tensor in tensors.items() if name.startswith("layer.")}
    for layer, tensor in moments.items():
        check_finite(tensor, f"{path}: layer {layer}")
    return moments
