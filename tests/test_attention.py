"""Grouped-query attention without repeated keys/values, and the prefix cache run in length groups."""

import pytest
import torch
from conftest import make_gpt2, make_llama
from test_values import _gemma3, _toy_local
from transformers import AttentionInterface

from editlib.model.attention import GROUPED_ATTENTION, grouped_attention, uses_grouped_queries
from editlib.model.forward import final_hidden, final_hidden_after, prefix_key_values, shared_stems
from editlib.model.tokens import pad_right

ROWS = [[5, 9, 14, 3, 22, 7, 30, 11], [8, 2, 19, 4], [6, 6, 21, 13, 2, 17], [12, 25, 3],
        [9, 4, 15, 28, 20, 5, 2], [3, 10, 7, 26, 18]]
SPLIT = [5, 2, 3, 1, 4, 2]  # prefix lengths: the rest of each row is the continuation


def _model(arch, llama_tokenizer):
    return {"llama": lambda: make_llama(llama_tokenizer),
            "gemma3-window-512": lambda: _gemma3(llama_tokenizer, 512),
            "gemma3-window-1": lambda: _gemma3(llama_tokenizer, 1)}[arch]()


@pytest.mark.parametrize("arch", ["llama", "gemma3-window-512", "gemma3-window-1"])
def test_grouped_attention_equals_the_models_own(arch, llama_tokenizer, monkeypatch):
    """Whole padded rows and cached prefixes + continuations give the hidden states of the model's
    own attention, the grouped function really runs, and the model's setting comes back after."""
    model = _model(arch, llama_tokenizer)
    assert uses_grouped_queries(model)
    own = model.config._attn_implementation
    calls = []
    function = AttentionInterface._global_mapping[GROUPED_ATTENTION]
    monkeypatch.setitem(AttentionInterface._global_mapping, GROUPED_ATTENTION,
                        lambda *args, **kwargs: calls.append(1) or function(*args, **kwargs))
    whole = pad_right(ROWS, 0)
    prefix = pad_right([r[:s] for r, s in zip(ROWS, SPLIT)], 0)
    rest = pad_right([r[s:] for r, s in zip(ROWS, SPLIT)], 0)
    positions = torch.tensor(SPLIT)[:, None] + torch.arange(rest.input_ids.shape[1])
    with torch.no_grad():
        expected = final_hidden(model, whole.input_ids, whole.attention_mask)
        with grouped_attention(model):
            assert model.config._attn_implementation == GROUPED_ATTENTION
            got = final_hidden(model, whole.input_ids, whole.attention_mask)
            cache = prefix_key_values(model, prefix.input_ids)
            continued = final_hidden_after(model, cache, prefix.attention_mask, rest.input_ids, rest.attention_mask,
                                           positions)
    assert calls and model.config._attn_implementation == own
    real = whole.attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    for i, (row, s) in enumerate(zip(ROWS, SPLIT)):
        torch.testing.assert_close(continued[i, : len(row) - s], expected[i, s: len(row)], rtol=1e-5, atol=1e-5)


def test_models_without_grouped_queries_keep_their_attention(llama_tokenizer, gpt2_tokenizer):
    for model in (make_gpt2(gpt2_tokenizer), _toy_local(llama_tokenizer),
                  make_llama(llama_tokenizer, num_key_value_heads=4)):
        own = model.config._attn_implementation
        assert not uses_grouped_queries(model)
        with grouped_attention(model):
            assert model.config._attn_implementation == own


def _assert_equal_at_real_positions(cache, expected, lengths):
    """Same keys and values as `expected` at every row's real positions, finite at its pads."""
    assert len(cache) == len(expected)
    for layer, layer_expected in zip(cache, expected):
        for got, want in zip(layer, layer_expected):
            assert got.shape == want.shape and got.isfinite().all()
            for i, n in enumerate(lengths.tolist()):
                torch.testing.assert_close(got[i, ..., :n, :], want[i, ..., :n, :], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3-window-512", "gpt2"])
def test_prefix_cache_in_length_groups_equals_one_pass(arch, llama_tokenizer, gpt2_tokenizer):
    """Keys and values of prefixes run in groups of similar length equal one padded pass at every
    real position (the pads beyond a group's longest row are zeros, never read)."""
    model = make_gpt2(gpt2_tokenizer) if arch == "gpt2" else _model(arch, llama_tokenizer)
    rows = ROWS * 3
    lengths = torch.tensor([len(r) for r in rows])
    prefix = pad_right(rows, 0)
    one = prefix_key_values(model, prefix.input_ids)
    grouped = prefix_key_values(model, prefix.input_ids, lengths=lengths, groups=3)
    _assert_equal_at_real_positions(grouped, one, lengths)


STEMMED = [[5, 9, 14, 3] + tail for tail in ([22, 7], [8], [30, 11, 2], [4, 4, 4, 4, 4])] + \
    [[6, 6, 21] + tail for tail in ([13], [2, 17, 9])] + [[12, 25, 3], [9], [5, 9, 20]]


def test_shared_stems_save_the_most_tokens():
    """Worked by hand: one stem of 2 for three rows saves 4 tokens, a stem of 3 for two rows 3."""
    assert shared_stems([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9], [7, 8]]) == [([0, 1, 2], 2)]
    # a long shared start for two rows beats a short one for three: 7 x 1 > 2 x 2
    assert shared_stems([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9], [1, 2, 7]]) == [([0, 1], 7)]
    assert shared_stems([[1, 2], [1, 2]]) == []  # every row keeps a token of its own: a stem of 1 < 2
    groups = shared_stems(STEMMED)
    assert sorted((sorted(m), n) for m, n in groups) == [([0, 1, 2, 3], 4), ([4, 5], 3)]


@pytest.mark.parametrize("arch", ["llama", "gemma3-window-512", "gpt2"])
def test_prefix_cache_with_shared_stems_equals_one_pass(arch, llama_tokenizer, gpt2_tokenizer, monkeypatch):
    """Stems run once, rests continued from their cache: the keys and values of one padded pass at
    every real position, finite at the pads."""
    model = make_gpt2(gpt2_tokenizer) if arch == "gpt2" else _model(arch, llama_tokenizer)
    tokens_run = []
    model.base_model.get_input_embeddings().register_forward_hook(lambda m, args, out: tokens_run.append(args[0].numel()))
    lengths = torch.tensor([len(r) for r in STEMMED])
    prefix = pad_right(STEMMED, 0)
    one = prefix_key_values(model, prefix.input_ids)
    tokens_run.clear()
    shared = prefix_key_values(model, prefix.input_ids, lengths=lengths, groups=2, share_stems=True)
    assert sum(tokens_run) < int(lengths.sum())  # the stems really ran once
    _assert_equal_at_real_positions(shared, one, lengths)
