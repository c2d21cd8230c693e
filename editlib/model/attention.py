"""Grouped-query attention without repeated keys and values, for short queries over a cache.

Target optimisation runs a few tokens per prompt (the subject's last token onwards) against a
cached prefix at every Adam step. With grouped-query attention (fewer key/value heads than query
heads, as in SmolLM2 and Llama-3), transformers' SDPA and eager paths copy every key and value
head once per query head (`repeat_kv`) whenever there is a padding mask, and sum the copies again
in the backward pass; for these shapes the copies cost more than the attention itself. Here the
query heads that share a key/value head are stacked along the query axis instead, so the keys and
values are read in place: the same attention, computed in another order (equal to float rounding).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

GROUPED_ATTENTION = "editlib_grouped"


def grouped_query_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of query (B, H, T, D) over key/value (B, K, S, D), H a multiple of K; the mask is
    additive (B, 1, T, S'), S' >= S. Returns (B, T, H, D), as transformers' attention functions do."""
    for name in ("softcap", "sinks", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"grouped_query_attention does not implement {name!r}")
    if dropout and module.training:
        raise ValueError("grouped_query_attention does not implement attention dropout")
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    # query head h = k * groups + g reads key/value head k: stack its groups along the query axis
    stacked = query.reshape(batch, kv_heads, groups * length, dim)
    scores = torch.matmul(stacked, key.transpose(-1, -2)) * (dim**-0.5 if scaling is None else scaling)
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        scores = scores.view(batch, kv_heads, groups, length, -1) + mask[:, :, None]
        scores = scores.view(batch, kv_heads, groups * length, -1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).view(batch, heads, length, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_ATTENTION, grouped_query_attention)
AttentionMaskInterface.register(GROUPED_ATTENTION, eager_mask)


def uses_grouped_queries(model: nn.Module) -> bool:
    """Whether `model` has fewer key/value heads than query heads (and no attention soft-capping)."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return bool(heads and kv_heads < heads and getattr(config, "attn_logit_softcapping", None) is None)


@contextlib.contextmanager
def grouped_attention(model: nn.Module) -> Iterator[None]:
    """Run `model`'s attention with `grouped_query_attention` inside the context (if it uses
    grouped queries; otherwise nothing changes); the previous implementation comes back after."""
    if not uses_grouped_queries(model):
        yield
        return
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}
    configs.update({id(m.config): m.config for m in model.modules() if hasattr(m, "config")})
    previous = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = GROUPED_ATTENTION
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = previous[key]
