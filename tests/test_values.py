"""Batched target optimisation equals the one-fact-at-a-time reference."""

import dataclasses

import torch

from editlib.models import model_layout
from editlib.values import TargetHparams, optimize_targets
from reference_z import reference_z


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
