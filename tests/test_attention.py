"""Grouped-query attention without repeated keys/values, and the prefix cache run in length groups."""

import pytest
import torch
from transformers import AttentionInterface

from conftest import make_gpt2, make_llama
from editlib.attention import GROUPED_ATTENTION, grouped_attention, uses_grouped_queries
from editlib.models import final_hidden, final_hidden_after, prefix_key_values
from editlib.tokens import pad_right
from test_values import _gemma3, _toy_local

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
    assert len(one) == len(grouped)
    for layer_one, layer_grouped in zip(one, grouped):
        for a, b in zip(layer_one, layer_grouped):
            assert a.shape == b.shape
            for i, n in enumerate(lengths.tolist()):
                torch.testing.assert_close(b[i, ..., :n, :], a[i, ..., :n, :], rtol=1e-5, atol=1e-5)
