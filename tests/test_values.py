"""Batched target optimisation equals the one-fact-at-a-time reference."""

import dataclasses

import pytest
import torch
from conftest import make_gpt2, make_llama
from reference_z import reference_z

from editlib.editing.keys import build_context_prompts
from editlib.editing.values import TargetHparams, optimize_targets
from editlib.model.layout import model_layout


def test_batched_z_equals_per_fact_reference(tiny_llama, llama_tokenizer, requests_):
    layout = model_layout(tiny_llama)
    templates = ["{}", "Some words here. {}", "Because {}"]
    hp = TargetHparams(v_num_grad_steps=8, clamp_norm_factor=4.0, v_weight_decay=0.5, early_stop_loss=5e-2)
    batched = optimize_targets(tiny_llama, llama_tokenizer, requests_, templates, layout.block(1), hp, progress=False)
    for i, request in enumerate(requests_):
        expected, loss = reference_z(tiny_llama, llama_tokenizer, request, templates, layout.block(1), hp)
        torch.testing.assert_close(batched.values[:, i], expected, rtol=2e-4, atol=2e-4)
        assert abs(float(batched.loss[i]) - loss) < 1e-3


def test_chunking_and_early_stop_keep_facts_independent(trained_llama2, llama_tokenizer, requests_):
    model = trained_llama2
    layout = model_layout(model)
    templates = ["{}", "Because {}"]
    hp = TargetHparams(v_num_grad_steps=12, clamp_norm_factor=20.0, v_weight_decay=1e-3, early_stop_loss=1.0)
    together = optimize_targets(model, llama_tokenizer, requests_, templates, layout.mlp(0), hp, progress=False)
    one_by_one = optimize_targets(model, llama_tokenizer, requests_, templates, layout.mlp(0),
                                  dataclasses.replace(hp, facts_per_chunk=1), progress=False)
    torch.testing.assert_close(together.values, one_by_one.values, rtol=1e-4, atol=1e-4)
    assert torch.equal(together.steps, one_by_one.steps)
    assert len(set(together.steps.tolist())) > 1  # facts stopped early at different steps


def _gemma3(tokenizer, sliding_window):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=sliding_window,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    model = Gemma3ForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _toy_local(tokenizer):
    """The toy-world architecture: self-only (window 1) layers with MLPs, then attention-only layers."""
    from editlib.toy.pretrain import TrainConfig, build_model

    model = build_model(TrainConfig(layers=3, hidden=64, intermediate=128, heads=4, local_layers=2, local_window=1,
                                    mlp_layers=2), tokenizer).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("arch", ["llama", "llama-eager", "gpt2", "gemma3-window-512", "gemma3-window-4", "toy-local"])
def test_cached_prefix_equals_full_rerun(arch, llama_tokenizer, gpt2_tokenizer, requests_):
    """Running the tokens before the subject once (key/value cache) gives the z of re-running whole prompts."""
    tokenizer = gpt2_tokenizer if arch == "gpt2" else llama_tokenizer
    model = {
        "llama": lambda: make_llama(tokenizer),
        "llama-eager": lambda: make_llama(tokenizer, attn_implementation="eager"),
        "gpt2": lambda: make_gpt2(tokenizer),
        "gemma3-window-512": lambda: _gemma3(tokenizer, 512),
        "gemma3-window-4": lambda: _gemma3(tokenizer, 4),  # prompts longer than the window: no split
        "toy-local": lambda: _toy_local(tokenizer),  # window 1: split, and the cache is exact
    }[arch]()
    layout = model_layout(model)
    templates = ["{}", "Some words here. {}", "Because of that, {}"]
    prompts = build_context_prompts(tokenizer, requests_, templates)
    assert int(prompts.subject_last.min()) >= 1 and len(set(prompts.subject_last.tolist())) > 2  # real splits
    hp = TargetHparams(v_num_grad_steps=6, clamp_norm_factor=4.0, early_stop_loss=0.0)
    for module in (layout.block(1), layout.mlp(0)):
        cached = optimize_targets(model, tokenizer, requests_, templates, module, hp, progress=False)
        full = optimize_targets(model, tokenizer, requests_, templates, module,
                                dataclasses.replace(hp, cache_prefix=False), progress=False)
        torch.testing.assert_close(cached.h_init, full.h_init, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached.values, full.values, rtol=2e-4, atol=2e-4)
        torch.testing.assert_close(cached.loss, full.loss, rtol=1e-4, atol=1e-4)
        moved = (cached.values - cached.h_init).norm(dim=0) > 0
        # with a window of 4 a fact's target tokens can lie out of the subject's reach: zero gradient
        assert moved.all() if arch != "gemma3-window-4" else moved.sum() >= len(requests_) - 1


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3-window-512", "toy-local"])
@pytest.mark.parametrize("cache_prefix", [True, False])
def test_replayed_lower_blocks_give_identical_z_and_run_once(arch, cache_prefix, llama_tokenizer, gpt2_tokenizer,
                                                             requests_):
    """Replaying the outputs of the blocks below the edited one gives bit-identical z; they run at one step only."""
    tokenizer = gpt2_tokenizer if arch == "gpt2" else llama_tokenizer
    model = {"llama": lambda: make_llama(tokenizer), "gpt2": lambda: make_gpt2(tokenizer),
             "gemma3-window-512": lambda: _gemma3(tokenizer, 512), "toy-local": lambda: _toy_local(tokenizer)}[arch]()
    layout = model_layout(model)
    templates = ["{}", "Some words here. {}"]
    hp = TargetHparams(v_num_grad_steps=5, clamp_norm_factor=4.0, early_stop_loss=0.0, cache_prefix=cache_prefix)
    calls = [0] * layout.n_layers
    for i in range(layout.n_layers):  # the attention runs only when its block is computed, not replayed
        model.get_submodule(layout.attn(i)).register_forward_pre_hook(
            lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
    for module, edited in ((layout.block(2), 2), (layout.mlp(1), 1)):
        calls[:] = [0] * layout.n_layers
        replayed = optimize_targets(model, tokenizer, requests_, templates, module, hp, progress=False,
                                    own_blocks=False)
        # (plus one prefix pass through every block when the prefix is cached)
        assert calls[:edited] == [calls[0]] * edited and calls[edited] - calls[0] == hp.v_num_grad_steps - 1
        rerun = optimize_targets(model, tokenizer, requests_, templates, module, hp, progress=False,
                                 replay_lower_blocks=False, own_blocks=False)
        assert torch.equal(replayed.values, rerun.values) and torch.equal(replayed.loss, rerun.loss)
        # (at the last block's output delta reaches only the subject's own token, and every prompt
        # here goes on after the subject: no gradient; the KL term's is zero where it starts)
        if edited < layout.n_layers - 1:
            assert (replayed.values - replayed.h_init).norm(dim=0).min() > 0
        else:
            assert torch.equal(replayed.values, replayed.h_init)
    for i in range(layout.n_layers):  # nothing of the replay is left on the model
        assert "forward" not in model.get_submodule(layout.block(i)).__dict__


@pytest.mark.parametrize("into_buffer", [False, True])
@pytest.mark.parametrize("with_reference", [False, True])
@pytest.mark.parametrize("n_tokens", [7, 20])
def test_target_head_equals_autograd_through_log_softmax(n_tokens, with_reference, into_buffer):
    """The output matrix + loss terms with their hand-written backward = autograd of the plain
    formulas, with the logits in a new tensor or written into a given buffer, in both layouts
    (10 rows: row-major, 23: vocabulary-major)."""
    from editlib.editing.values import VOCAB_MAJOR_MIN_ROWS, _TargetHead

    torch.manual_seed(0)
    n_kl, width, vocab = 3, 16, 50
    assert (n_tokens + n_kl >= VOCAB_MAJOR_MIN_ROWS) == (n_tokens == 20)
    weight, bias = torch.randn(vocab, width, dtype=torch.float64), torch.randn(vocab, dtype=torch.float64)
    hidden = torch.randn(n_tokens + n_kl, width, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(vocab, (n_tokens,))
    reference = torch.log_softmax(torch.randn(n_kl, vocab, dtype=torch.float64), -1) if with_reference else None
    buffer = _TargetHead.logits_buffer(weight, n_tokens + n_kl).fill_(float("nan")) if into_buffer else None
    token_logp, kl, kl_logp = _TargetHead.apply(hidden, weight, bias, labels, reference, buffer)
    logp = torch.log_softmax(hidden @ weight.T + bias, dim=-1)
    expected_token = logp[torch.arange(n_tokens), labels]
    expected_kl = (logp[n_tokens:].exp() * (logp[n_tokens:] - (logp[n_tokens:].detach() if reference is None
                                                                else reference))).sum(-1)
    torch.testing.assert_close(token_logp, expected_token)
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(kl_logp, logp[n_tokens:].detach())
    a, b = torch.randn(n_tokens, dtype=torch.float64), torch.randn(n_kl, dtype=torch.float64)
    (ours,) = torch.autograd.grad((token_logp * a).sum() + (kl * b).sum(), hidden)
    (plain,) = torch.autograd.grad((expected_token * a).sum() + (expected_kl * b).sum(), hidden)
    torch.testing.assert_close(ours, plain, rtol=1e-10, atol=1e-12)
    assert ours[n_tokens:].abs().max() > 0 if with_reference else ours[n_tokens:].abs().max() < 1e-12
    if into_buffer:  # the buffer held the logits, then their gradient
        assert torch.isfinite(buffer).all()
        token_logp, kl, _ = _TargetHead.apply(hidden, weight, bias, labels, reference, buffer)
        _TargetHead.apply(hidden, weight, bias, labels, reference, buffer)  # overwrites the buffer
        with pytest.raises(RuntimeError, match="overwritten"):
            torch.autograd.grad(token_logp.sum() + kl.sum(), hidden)
