"""editlib's own Llama blocks above the edited layer equal the model's, forward and backward."""

import dataclasses

import pytest
import torch
from conftest import make_gpt2, make_llama
from test_attention import ROWS, SPLIT
from test_values import _toy_local

from editlib.editing.values import TargetHparams, optimize_targets
from editlib.model import upper_blocks
from editlib.model.forward import final_hidden, final_hidden_after, prefix_key_values
from editlib.model.hooks import capture_outputs
from editlib.model.layout import model_layout
from editlib.model.tokens import pad_right

VARIANTS = {
    "llama": {},
    "llama-attention-bias": {"attention_bias": True},
    "llama-no-grouping": {"num_key_value_heads": 4},
    "llama3-rope": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
}


def _llama(tokenizer, variant, **overrides):
    model = make_llama(tokenizer, layers=4, **VARIANTS[variant], **overrides)
    if variant == "llama-attention-bias":  # the random init leaves biases at zero
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1 and p.shape[0] != model.config.hidden_size:
                    p.normal_()
    return model


def _masks(rows, prefix_length, length):
    """Right-padded prefixes of lengths 1..prefix_length and continuations of 1..length tokens."""
    prefix_mask = (torch.arange(prefix_length) < torch.arange(rows)[:, None] % prefix_length + 1).long()
    attention_mask = (torch.arange(length) < length - torch.arange(rows)[:, None] % length).long()
    return prefix_mask, attention_mask


@pytest.mark.parametrize("mlp_weight_major", [False, True])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_block_function_equals_the_plain_block_and_its_gradient(variant, mlp_weight_major, llama_tokenizer,
                                                                 monkeypatch):
    """In fp64: output and gradient of the hand-written blocks = autograd through the same blocks
    written as plain operations (`llama_block`, the model's own modules and dimension order), with
    the MLP token-major and weight-major."""
    monkeypatch.setattr(upper_blocks, "MLP_WEIGHT_MAJOR_TOKENS", range(1, 10**9) if mlp_weight_major else range(0))
    model = _llama(llama_tokenizer, variant).double()
    with torch.no_grad():  # the prepared products carry the RMSNorm weights (initialised to ones)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    config = model.config
    rows, prefix_length, length, dim = 5, 4, 3, config.hidden_size // config.num_attention_heads
    kv_heads = config.num_key_value_heads
    torch.manual_seed(1)
    prefix = [(torch.randn(rows, kv_heads, prefix_length, dim, dtype=torch.float64),
               torch.randn(rows, kv_heads, prefix_length, dim, dtype=torch.float64)) for _ in range(4)]
    prefix_mask, attention_mask = _masks(rows, prefix_length, length)
    positions = prefix_mask.sum(1, keepdim=True) + torch.arange(length) + 3
    x = torch.randn(rows, length, config.hidden_size, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(rows, length, config.hidden_size, dtype=torch.float64)

    ours = upper_blocks.UpperBlocks(model, 0, prefix, prefix_mask, attention_mask, positions)(x)
    cos, sin = model.model.rotary_emb(x, positions)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    visible = torch.cat([prefix_mask.bool()[:, None, :].expand(-1, length, -1),
                         causal & attention_mask.bool()[:, None, :]], dim=-1)
    bias = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, -1e30)[:, None]
    hidden = x
    for layer in range(1, 4):
        hidden = upper_blocks.llama_block(model.model.layers[layer], hidden, *prefix[layer], bias, cos, sin,
                                          config.num_attention_heads, kv_heads)
    norm = model.model.norm
    plain = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
    real = attention_mask.bool()
    torch.testing.assert_close(ours[real], plain[real], rtol=1e-10, atol=1e-10)
    (grad_ours,) = torch.autograd.grad((ours * weights)[real].sum(), x)
    (grad_plain,) = torch.autograd.grad((plain * weights)[real].sum(), x)
    torch.testing.assert_close(grad_ours, grad_plain, rtol=1e-9, atol=1e-10)
    assert grad_ours[real].abs().min() > 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_upper_blocks_continue_the_models_forward_pass(variant, llama_tokenizer):
    """fp32: block `layer`'s output (captured from the model) through the own
    blocks gives the model's final hidden states, from cached prefixes as from whole rows."""
    model = _llama(llama_tokenizer, variant)
    whole = pad_right(ROWS, 0)
    prefix = pad_right([r[:s] for r, s in zip(ROWS, SPLIT)], 0)
    rest = pad_right([r[s:] for r, s in zip(ROWS, SPLIT)], 0)
    positions = torch.tensor(SPLIT)[:, None] + torch.arange(rest.input_ids.shape[1])
    layout = model_layout(model)
    with torch.no_grad():
        expected = final_hidden(model, whole.input_ids, whole.attention_mask)
        cache = prefix_key_values(model, prefix.input_ids)
        for layer in (0, 2):
            with capture_outputs(model, [layout.block(layer)]) as captured:
                final_hidden_after(model, cache, prefix.attention_mask, rest.input_ids, rest.attention_mask, positions)
            got = upper_blocks.UpperBlocks(model, layer, cache, prefix.attention_mask, rest.attention_mask,
                                           positions)(captured[layout.block(layer)])
            for i, (row, s) in enumerate(zip(ROWS, SPLIT)):
                torch.testing.assert_close(got[i, : len(row) - s], expected[i, s: len(row)], rtol=1e-5, atol=1e-5)


def test_prepared_weights_follow_changes_to_the_model(llama_tokenizer):
    """Prepared weights are reused while the block is unchanged, and prepared again once a weight changes."""
    model = _llama(llama_tokenizer, "llama")
    batch = pad_right(ROWS, 0)
    positions = torch.arange(batch.input_ids.shape[1]).expand(len(ROWS), -1)
    layout = model_layout(model)

    def both():
        with torch.no_grad(), capture_outputs(model, [layout.block(0)]) as captured:
            expected = final_hidden(model, batch.input_ids, batch.attention_mask)
            upper = upper_blocks.UpperBlocks(model, 0, None, batch.attention_mask[:, :0], batch.attention_mask,
                                             positions)
            return upper, upper(captured[layout.block(0)]), expected

    first, got, expected = both()
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    second, _, _ = both()
    assert second.blocks[0].gate_up is first.blocks[0].gate_up  # reused
    with torch.no_grad():  # the prepared gate/up matrix is a copy: it must be prepared again
        model.model.layers[1].mlp.gate_proj.weight.mul_(3.0)
    third, got, expected = both()
    assert third.blocks[0].gate_up is not first.blocks[0].gate_up and third.blocks[1].gate_up is first.blocks[1].gate_up
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # so is the query/key/value matrix, which carries the input norm's weight
        model.model.layers[2].input_layernorm.weight.uniform_(0.5, 1.5)
    fourth, got, expected = both()
    assert fourth.blocks[1].qkv is not first.blocks[1].qkv and fourth.blocks[2].qkv is first.blocks[2].qkv
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_a_backward_pass_after_a_later_forward_pass_is_refused(llama_tokenizer):
    """Each block keeps one buffer for the new tokens' keys and values, which every forward pass
    rewrites: a backward pass through an earlier forward pass would read the wrong ones."""
    model = _llama(llama_tokenizer, "llama")
    batch = pad_right(ROWS, 0)
    positions = torch.arange(batch.input_ids.shape[1]).expand(len(ROWS), -1)
    upper = upper_blocks.UpperBlocks(model, 0, None, batch.attention_mask[:, :0], batch.attention_mask, positions)
    x = torch.randn(len(ROWS), batch.input_ids.shape[1], model.config.hidden_size, requires_grad=True)
    first = upper(x).sum()
    second = upper(x * 2).sum()
    torch.autograd.grad(second, x, retain_graph=True)  # the latest forward pass: fine
    with pytest.raises(RuntimeError, match="ran forward again"):
        torch.autograd.grad(first, x)


@pytest.mark.parametrize("cache_prefix", [True, False])
@pytest.mark.parametrize("variant", ["llama", "llama-attention-bias"])
def test_z_with_own_blocks_equals_z_through_the_models_modules(variant, cache_prefix, llama_tokenizer, requests_):
    model = _llama(llama_tokenizer, variant)
    layout = model_layout(model)
    templates = ["{}", "Some words here. {}", "Because of that, {}"]
    hp = TargetHparams(v_num_grad_steps=6, clamp_norm_factor=4.0, early_stop_loss=0.0, cache_prefix=cache_prefix)
    for module in (layout.block(1), layout.mlp(0)):
        assert upper_blocks.supports(model, module)
        own = optimize_targets(model, llama_tokenizer, requests_, templates, module, hp, progress=False)
        modules = optimize_targets(model, llama_tokenizer, requests_, templates, module, hp, progress=False,
                                   own_blocks=False)
        torch.testing.assert_close(own.h_init, modules.h_init, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(own.values, modules.values, rtol=2e-4, atol=2e-4)
        torch.testing.assert_close(own.loss, modules.loss, rtol=1e-4, atol=1e-4)
        assert (own.values - own.h_init).norm(dim=0).min() > 0
    early = dataclasses.replace(hp, v_num_grad_steps=20, early_stop_loss=3.0)
    own = optimize_targets(model, llama_tokenizer, requests_, templates, layout.block(1), early, progress=False)
    modules = optimize_targets(model, llama_tokenizer, requests_, templates, layout.block(1), early,
                               progress=False, own_blocks=False)
    assert torch.equal(own.steps, modules.steps)


def test_which_models_run_own_blocks(llama_tokenizer, gpt2_tokenizer):
    llama = _llama(llama_tokenizer, "llama")
    layout = model_layout(llama)
    assert upper_blocks.supports(llama, layout.block(2)) and upper_blocks.supports(llama, layout.mlp(0))
    assert not upper_blocks.supports(llama, layout.attn(1))  # its block's output is not output + delta
    assert not upper_blocks.supports(llama.to(torch.bfloat16), layout.block(1))
    gpt2, toy = make_gpt2(gpt2_tokenizer), _toy_local(llama_tokenizer)
    assert not upper_blocks.supports(gpt2, model_layout(gpt2).block(1))
    assert not upper_blocks.supports(toy, model_layout(toy).block(1))  # Qwen2 with windows of one token


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_own_prefix_pass_equals_the_models(variant, llama_tokenizer, monkeypatch):
    """Prefix keys and values from the prepared weights (whole rows, ragged rows, and with shared
    stems that their rows continue) = the model's own pass at every real position."""
    from test_attention import STEMMED, _assert_equal_at_real_positions

    model = _llama(llama_tokenizer, variant)
    with torch.no_grad():  # the prepared products carry the RMSNorm weights
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    calls = []
    own = upper_blocks.prefix_key_values
    monkeypatch.setattr(upper_blocks, "prefix_key_values", lambda *a: calls.append(len(a[3])) or own(*a))
    lengths = torch.tensor([len(r) for r in STEMMED])
    prefix = pad_right(STEMMED, 0)
    expected = prefix_key_values(model, prefix.input_ids)
    assert not calls
    whole = prefix_key_values(model, prefix.input_ids, own_blocks=True)
    _assert_equal_at_real_positions(whole, expected, torch.full_like(lengths, prefix.input_ids.shape[1]))
    ragged = prefix_key_values(model, prefix.input_ids, lengths=lengths, own_blocks=True)
    _assert_equal_at_real_positions(ragged, expected, lengths)
    stemmed = prefix_key_values(model, prefix.input_ids, lengths=lengths, share_stems=True, own_blocks=True)
    _assert_equal_at_real_positions(stemmed, expected, lengths)
    assert calls == [0, 0, 2]  # all three ran on the own blocks, the last with STEMMED's two stems
    for layer in stemmed:  # zeros beyond each row's length
        for tensor in layer:
            assert all(tensor[i, ..., n:, :].abs().max() == 0 for i, n in enumerate(lengths.tolist()) if n < tensor.shape[-2])
