"""Forward passes shared by editing and scoring: final hidden states, and prompts run once into a
key/value cache (shared stems, length groups) with their continuations scored over it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import DynamicCache


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states (B, T, d) without computing logits for every position."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@torch.no_grad()
def prefix_key_values(model: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor | None = None,
                      groups: int = 4, return_hidden: bool = False, share_stems: bool = False,
                      own_blocks: bool = False):
    """Per-layer (keys, values) of right-padded prefixes, for `final_hidden_after`; None if empty.

    No padding mask: with causal attention and pads at the end, valid positions never see a pad,
    and pad positions stay finite (they are masked out when the continuation reads the cache).
    With `lengths` (each row's real prefix length), the rows run in up to `groups` passes of
    similar lengths, each padded only to its own longest row; the pads beyond it are zeros.
    With `share_stems` too, rows that start with the same tokens (`shared_stems`) run those tokens
    once and continue from their cache (same keys and values at every real position; only where
    `continuation_exact` holds, else as without it).
    With `own_blocks`, on models `upper_blocks.runs_on`, the pass runs forward only on the prepared
    weights of `editlib.model.upper_blocks` (its `prefix_key_values`: one product per layer over every
    token, no pads; the same keys and values to float rounding, zeros at the pads).
    With `return_hidden` (one pass only), also the final hidden states (B, P, d): (cache, hidden).
    """
    if return_hidden:
        return _prefix_pass(model, input_ids)
    if input_ids.shape[1] == 0:
        return None
    if own_blocks:
        from editlib.model import upper_blocks

        if upper_blocks.runs_on(model):
            lengths = torch.full((len(input_ids),), input_ids.shape[1]) if lengths is None else lengths
            rows = [ids[:n] for ids, n in zip(input_ids.tolist(), lengths.tolist())]
            return upper_blocks.prefix_key_values(model, input_ids, lengths, shared_stems(rows) if share_stems else [])
    if lengths is None:
        return _prefix_pass(model, input_ids)[0]
    lengths = lengths.to(input_ids.device)
    if share_stems and continuation_exact(model, 2 * input_ids.shape[1]):
        rows = [ids[:n] for ids, n in zip(input_ids.tolist(), lengths.tolist())]
        stems = shared_stems(rows)
        if stems:
            return _stem_prefix_pass(model, input_ids, lengths, stems, groups)
    return _length_grouped_pass(model, input_ids, lengths, groups)


def shared_stems(rows: Sequence[Sequence[int]], min_shared: int = 2) -> list[tuple[list[int], int]]:
    """Groups of rows that start with the same tokens: (row indices, stem length) with every row of
    a group starting with the same `stem length` >= `min_shared` tokens and longer than them.

    Chosen to save the most tokens (stem length x (rows - 1), summed over groups): the rows sorted,
    each run of rows is either one group (the run's common start) or split where that start is
    shortest, whichever saves more. Rows in no group are left out.
    """
    order = sorted(range(len(rows)), key=lambda r: tuple(rows[r]))
    common = [_common_start(rows[a], rows[b]) for a, b in zip(order, order[1:])]

    def best(lo: int, hi: int) -> tuple[int, list[tuple[list[int], int]]]:  # order[lo..hi]
        if lo == hi:
            return 0, []
        shortest = min(common[lo:hi])
        members = order[lo: hi + 1]
        stem = min(shortest, min(len(rows[r]) for r in members) - 1)
        whole = (stem * (hi - lo), [(members, stem)]) if stem >= min_shared else (0, [])
        saved, found, start = 0, [], lo
        for cut in [i for i in range(lo, hi) if common[i] == shortest] + [hi]:
            part_saved, part_groups = best(start, cut)
            saved, found, start = saved + part_saved, found + part_groups, cut + 1
        return whole if whole[0] >= saved else (saved, found)

    return best(0, len(rows) - 1)[1] if rows else []


def _common_start(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _length_grouped_pass(model: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor, groups: int):
    if groups <= 1 or len(lengths) < 2 * groups:
        return _prefix_pass(model, input_ids)[0]
    parts = [(rows, _prefix_pass(model, input_ids[rows, : max(1, int(lengths[rows].max()))])[0])
             for rows in torch.argsort(lengths, stable=True).tensor_split(groups)]
    merged = []
    for layer in range(len(parts[0][1])):  # each cache tensor is (rows, heads, positions, head dim)
        tensors = []
        for k, like in enumerate(parts[0][1][layer]):
            full = like.new_zeros(len(lengths), *like.shape[1:-2], input_ids.shape[1], like.shape[-1])
            for rows, cache in parts:
                full[rows, ..., : cache[layer][k].shape[-2], :] = cache[layer][k]
            tensors.append(full)
        merged.append(tuple(tensors))
    return merged


def _stem_prefix_pass(model: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor,
                      stems: list[tuple[list[int], int]], groups: int):
    """`prefix_key_values` with each group's shared stem run once: the stems in one length-grouped
    pass, then every row's rest (a row in no group: all of it) in passes of similar rest length
    that read their stem's cache, the result laid out as one right-padded pass would be."""
    device = input_ids.device
    stem_of = torch.zeros(len(lengths), dtype=torch.long, device=device)
    stem_len = torch.zeros(len(lengths), dtype=torch.long, device=device)
    for index, (members, length) in enumerate(stems):
        stem_of[members], stem_len[members] = index, length
    stem_lengths = torch.tensor([n for _, n in stems], device=device)
    stem_ids = input_ids[[members[0] for members, _ in stems], : int(stem_lengths.max())]
    stem_cache = _length_grouped_pass(model, stem_ids, stem_lengths, groups)
    rest_len = (lengths - stem_len).clamp(min=1)
    n_positions = input_ids.shape[1]
    merged = None
    for rows in torch.argsort(rest_len, stable=True).tensor_split(min(groups, len(lengths))):
        if len(rows) == 0:
            continue
        width, past_width = int(rest_len[rows].max()), int(stem_len[rows].max())
        offset = torch.arange(width, device=device)
        source = (stem_len[rows, None] + offset).clamp(max=n_positions - 1)
        ids = input_ids[rows[:, None], source]
        if past_width == 0:
            layers = _prefix_pass(model, ids)[0]
        else:
            past = [tuple(t[stem_of[rows], ..., :past_width, :] for t in layer[:2]) for layer in stem_cache]
            mask = torch.cat([torch.arange(past_width, device=device) < stem_len[rows, None],
                              torch.ones(len(rows), width, dtype=torch.bool, device=device)], dim=1).long()
            output = model.base_model(input_ids=ids, attention_mask=mask, position_ids=stem_len[rows, None] + offset,
                                      past_key_values=DynamicCache(ddp_cache_data=past), use_cache=True)
            layers = [(layer.keys, layer.values) for layer in output.past_key_values.layers]
        # position p of a row: its stem's slot p below its stem length, else slot past_width + p - stem length
        position = torch.arange(n_positions, device=device)
        slot = torch.where(position < stem_len[rows, None], position, past_width + position - stem_len[rows, None])
        computed = position < stem_len[rows, None] + width
        slot = torch.where(computed, slot, 0)
        if merged is None:
            merged = [tuple(t.new_zeros(len(lengths), *t.shape[1:-2], n_positions, t.shape[-1]) for t in layer)
                      for layer in layers]
        for full_layer, layer in zip(merged, layers):
            for full, tensor in zip(full_layer, layer):
                moved = tensor.movedim(-2, 1)  # (rows, positions, heads..., head dim)
                picked = moved[torch.arange(len(rows), device=device)[:, None], slot]
                picked[~computed] = 0
                full[rows] = picked.movedim(1, -2)
    return merged


def _prefix_pass(model: nn.Module, input_ids: torch.Tensor) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]:
    """One pass over the prefixes: per-layer (keys, values) and the final hidden states."""
    # a plain cache keeps every position in every layer (a sliding-window layer's own cache would
    # drop the oldest ones); sliding masks are applied from positions when the cache is read back
    output = model.base_model(input_ids=input_ids, past_key_values=DynamicCache(), use_cache=True)
    return [(layer.keys, layer.values) for layer in output.past_key_values.layers], output.last_hidden_state


def split_rows(model: nn.Module, rows: Sequence[Sequence[int]], split: torch.Tensor, pad: int, device,
               share_stems: bool = True, own_blocks: bool = True):
    """Token rows cut at `split` (R,): the prefixes run once into a key/value cache
    (`prefix_key_values` with their lengths), the rests right-padded for `final_hidden_after`.
    Returns (prefix mask (R, P), the rests (`tokens.PaddedBatch`), the cache, the rests' positions (R, T))."""
    from editlib.model.tokens import pad_right

    cuts = split.tolist()
    prefix = pad_right([ids[:s] for ids, s in zip(rows, cuts)], pad).to(device)
    rest = pad_right([ids[s:] for ids, s in zip(rows, cuts)], pad).to(device)
    cache = prefix_key_values(model, prefix.input_ids, lengths=split, share_stems=share_stems, own_blocks=own_blocks)
    position_ids = split.to(device)[:, None] + torch.arange(rest.input_ids.shape[1], device=device)
    return prefix.attention_mask, rest, cache, position_ids


def continuation_exact(model: nn.Module, longest: int) -> bool:
    """Whether a cached prefix + continuation gives the logits of the whole row on `model`.

    Sliding-window layers mask by cache index, which padded prefixes shift, so this holds only when
    the longest padded prefix + continuation (`longest` positions) fits within the window (then the
    window masks nothing) or the window is one token (each token sees only itself).
    """
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    return not (window and window > 1 and longest > window)


def final_hidden_after(
    model: nn.Module,
    prefix: list[tuple[torch.Tensor, ...]] | None,
    prefix_mask: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
) -> torch.Tensor:
    """Final hidden states (B, T, d) of continuations of cached prefixes (see `prefix_key_values`).

    `prefix_mask` (B, P) marks each row's real prefix tokens; `position_ids` (B, T) continue them.
    The cache is rebuilt from the prefix tensors on every call, so they are never modified.
    """
    if prefix is None:
        return model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids).last_hidden_state
    cache = DynamicCache(ddp_cache_data=prefix)
    mask = torch.cat([prefix_mask, attention_mask], dim=1)
    return model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=True).last_hidden_state
