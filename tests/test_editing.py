"""Editing sessions end to end on tiny models: edits take, constraints hold, state round-trips."""

import pytest
import torch
from conftest import NAMES, fact_object, make_llama

from editlib.data.records import EditRequest
from editlib.editing.editor import Editor
from editlib.editing.keys import build_context_prompts, compute_keys
from editlib.editing.statistics import collect_second_moments
from editlib.eval.metrics import counterfact_scores, edit_metrics
from editlib.methods.registry import make_hparams
from editlib.model.hooks import capture_outputs
from editlib.model.layout import edited_weight, model_layout

TARGETS = {"clamp_norm_factor": 20.0, "v_num_grad_steps": 40, "v_weight_decay": 1e-3, "v_lr": 0.5}
TEMPLATES = ["{}", "Because of this. {}", "I think so. {}"]


def subject_final_requests(n=3):
    """Prompts ending with the subject, so the edited token is the predicting one in a 2-layer model."""
    objects = ["guitar", "Berlin", "Dutch", "piano"]
    return [EditRequest(case_id=i, prompt="{}", subject=NAMES[i], target_new=objects[i],
                        target_true=fact_object(0, i), paraphrase_prompts=(f"Yes. {NAMES[i]}",),
                        neighborhood_prompts=(NAMES[i + 5],)) for i in range(n)]



def hparams_for(method, moments, layers=(0,), **extra):
    # AlphaEdit: null space = the 3/4 of C's spectrum with the least variance, ridge scaled to tiny keys
    alpha = {"nullspace_threshold": float(torch.linalg.eigvalsh(moments[layers[0]].double())[96]), "l2": 1e-2}
    mu = None if method in ("alphaedit", "rome", "r-rome") else 1.0
    return make_hparams(method, layers=layers, targets=TARGETS, mom2_update_weight=mu,
                        **(alpha if method == "alphaedit" else {}), **extra)


@pytest.mark.parametrize("method", ["rome", "r-rome", "memit", "emmet", "alphaedit"])
def test_edit_makes_target_new_win(method, trained_llama2, llama_tokenizer, moments2):
    requests = subject_final_requests()
    before = counterfact_scores(trained_llama2, llama_tokenizer, requests)
    editor = Editor(trained_llama2, llama_tokenizer, hparams_for(method, moments2), moments2, TEMPLATES, progress=False)
    editor.apply(requests)
    after = counterfact_scores(trained_llama2, llama_tokenizer, requests)
    rewrite = before.kind == "rewrite"
    assert (after.nll_new[rewrite] < before.nll_new[rewrite] - 0.5).all(), (method, before, after)
    assert edit_metrics(after)["ES"] == 100.0, (method, after)


def test_rome_writes_v_star_at_the_key(trained_llama2, llama_tokenizer, moments2):
    requests = subject_final_requests(1)
    for method in ("rome", "r-rome"):
        editor = Editor(trained_llama2, llama_tokenizer, hparams_for(method, moments2), moments2, TEMPLATES, progress=False)
        residual, direction, _ = editor._rome_factors(requests)
        layout = editor.layout
        prompts = build_context_prompts(llama_tokenizer, requests, TEMPLATES)
        keys, _ = compute_keys(trained_llama2, llama_tokenizer, layout, [0], prompts, "uniform")
        k_den = keys[0] if method == "r-rome" else compute_keys(trained_llama2, llama_tokenizer, layout, [0],
                                                                 build_context_prompts(llama_tokenizer, requests, ["{}"]))[0][0]
        weight = edited_weight(trained_llama2, layout, 0).double()
        v_star = weight @ k_den.double() + residual  # the target ROME must write
        editor.apply(requests)
        written = edited_weight(trained_llama2, layout, 0).double() @ k_den.double()
        assert (written - v_star).norm() / v_star.norm() < 1e-4
        editor.restore()


def test_emmet_edited_keys_map_to_targets(trained_llama2, llama_tokenizer, moments2):
    requests = subject_final_requests(3)
    hp = hparams_for("emmet", moments2, emmet_lambda=1e-9)
    editor = Editor(trained_llama2, llama_tokenizer, hp, moments2, TEMPLATES, progress=False)
    layout = editor.layout
    prompts = build_context_prompts(llama_tokenizer, requests, TEMPLATES)
    keys, outputs = compute_keys(trained_llama2, llama_tokenizer, layout, [0], prompts, "memit", [layout.block(0)])
    residuals, _, _ = editor._spread_updates(requests, independent=False)
    delta = editor.total[0].double()
    torch.testing.assert_close(delta @ keys[0].double(), residuals[0].double(), rtol=1e-4, atol=1e-4)


def test_memit_spreads_residual_over_layers(trained_llama2, llama_tokenizer, moments2):
    requests = subject_final_requests(2)
    editor = Editor(trained_llama2, llama_tokenizer, hparams_for("memit", moments2, layers=(0, 1)), moments2,
                    TEMPLATES, progress=False)
    report = editor.apply(requests)
    assert set(report["residual_norm"]) == {0, 1}
    assert all(editor.total[layer].norm() > 0 for layer in (0, 1))


def test_alphaedit_accumulates_edited_keys(trained_llama2, llama_tokenizer, moments2):
    requests = subject_final_requests(4)
    editor = Editor(trained_llama2, llama_tokenizer, hparams_for("alphaedit", moments2), moments2, TEMPLATES, progress=False)
    editor.apply(requests[:2])
    first = editor.key_products[0].clone()
    editor.apply(requests[2:])
    second = editor.key_products[0]
    prompts = build_context_prompts(llama_tokenizer, requests[2:], TEMPLATES)
    keys, _ = compute_keys(trained_llama2, llama_tokenizer, editor.layout, [0], prompts, "memit")
    torch.testing.assert_close(second - first, keys[0].double() @ keys[0].double().T, rtol=1e-6, atol=1e-8)
    assert torch.trace(second) > torch.trace(first) > 0


def test_restore_save_and_reload_are_bit_exact(trained_llama2, llama_tokenizer, moments2, trained_llama2_state, tmp_path):
    requests = subject_final_requests(2)
    layout = model_layout(trained_llama2)
    original = edited_weight(trained_llama2, layout, 0).clone()
    editor = Editor(trained_llama2, llama_tokenizer, hparams_for("alphaedit", moments2), moments2, TEMPLATES, progress=False)
    editor.apply(requests)
    edited = edited_weight(trained_llama2, layout, 0).clone()
    editor.save(tmp_path / "edit.safetensors")
    editor.restore()
    assert torch.equal(edited_weight(trained_llama2, layout, 0), original)

    fresh = make_llama(llama_tokenizer, layers=2)
    fresh.load_state_dict(trained_llama2_state)
    other = Editor(fresh, llama_tokenizer, hparams_for("alphaedit", moments2), moments2, TEMPLATES, progress=False)
    other.load(tmp_path / "edit.safetensors")
    assert torch.equal(edited_weight(fresh, layout, 0), edited)
    torch.testing.assert_close(other.key_products[0], editor.key_products[0] if editor.key_products[0] is not None
                               else other.key_products[0])


def test_single_edits_match_applying_each_alone(trained_llama2, llama_tokenizer, moments2):
    requests = subject_final_requests(3)
    for method, layers in (("memit", (0,)), ("rome", (0,)), ("memit", (0, 1))):
        editor = Editor(trained_llama2, llama_tokenizer, hparams_for(method, moments2, layers=layers), moments2,
                        TEMPLATES, progress=False)
        edits = editor.single_edits(requests)
        for i, request in enumerate(requests):
            editor.apply([request])
            for layer in layers:
                torch.testing.assert_close(editor.total[layer].double(), edits.delta(layer, i), rtol=1e-4, atol=1e-5)
            editor.restore()


def test_gpt2_conv1d_edit(tiny_gpt2, gpt2_tokenizer, corpus):
    layout = model_layout(tiny_gpt2)
    moments = {1: collect_second_moments(tiny_gpt2, gpt2_tokenizer, layout, [1], corpus, progress=False)[1].mean}
    hp = make_hparams("emmet", layers=(1,), targets={"v_num_grad_steps": 3}, mom2_update_weight=1.0, emmet_lambda=1e-9)
    editor = Editor(tiny_gpt2, gpt2_tokenizer, hp, moments, TEMPLATES, progress=False)
    requests = subject_final_requests(2)
    residuals, _, _ = editor._spread_updates(requests, independent=False)
    conv = tiny_gpt2.get_submodule(layout.rewrite(1))
    assert conv.weight.shape == (256, 64)  # stored (in, out)
    delta = editor.total[1].double()
    assert delta.shape == (64, 256)
    prompts = build_context_prompts(gpt2_tokenizer, requests, TEMPLATES)
    keys, _ = compute_keys(tiny_gpt2, gpt2_tokenizer, layout, [1], prompts, "memit")
    torch.testing.assert_close(delta @ keys[1].double(), residuals[1].double(), rtol=1e-4, atol=1e-4)
    # the module really computes with the edited weight
    with capture_outputs(tiny_gpt2, [layout.rewrite(1)]) as out:
        tiny_gpt2(input_ids=torch.tensor([gpt2_tokenizer("Kotor")["input_ids"]]))
    assert torch.isfinite(out[layout.rewrite(1)]).all()


def test_targets_reused_on_unedited_weights_only(trained_llama2, llama_tokenizer, moments2):
    """A fact's z computed in one batch is reused in another batch on the unedited model (same
    update as a fresh session), and never once the weights carry edits."""
    requests = subject_final_requests(3)
    hp = hparams_for("memit", moments2)
    layer = hp.layers[0]
    weight = lambda: edited_weight(trained_llama2, model_layout(trained_llama2), layer).detach().clone()  # noqa: E731
    reusing = Editor(trained_llama2, llama_tokenizer, hp, moments2, TEMPLATES, progress=False)
    reusing.apply(requests)  # computes and caches z of all three facts
    reusing.restore()
    reusing.apply(requests[:2])  # z from the cache
    cached = weight()
    reusing.restore()
    fresh = Editor(trained_llama2, llama_tokenizer, hp, moments2, TEMPLATES, progress=False)
    fresh.apply(requests[:2])
    torch.testing.assert_close(cached, weight(), rtol=1e-4, atol=1e-5)
    n_cached = len(fresh._target_cache)
    fresh.apply(requests[2:])  # weights edited now: z must be recomputed, not cached
    assert len(fresh._target_cache) == n_cached
    fresh.restore()


def test_subset_metrics_from_one_scoring_pass_equal_scoring_the_subset(trained_llama2, llama_tokenizer, moments2):
    """Sequential runs score all edited facts once and take the current batch's rows from it."""
    from editlib.study.experiments import ExperimentContext, records_metrics, score_records

    requests = subject_final_requests(3)
    ctx = ExperimentContext(trained_llama2, llama_tokenizer, "tiny", moments2, progress=False)
    editor = Editor(trained_llama2, llama_tokenizer, hparams_for("memit", moments2), moments2, TEMPLATES, progress=False)
    editor.apply(requests)
    try:
        from_all = records_metrics(ctx, score_records(ctx, requests, editor), requests[1:])
        alone = edit_metrics(counterfact_scores(trained_llama2, llama_tokenizer, requests[1:]))
        assert from_all.keys() == alone.keys()
        for name in alone:
            assert from_all[name] == pytest.approx(alone[name], abs=1e-6), name
    finally:
        editor.restore()


def test_sensitivity_at_the_configured_value_is_the_single_edit_experiment(trained_llama2, llama_tokenizer, moments2):
    """One row per swept value; at a value equal to the configured one the row is the single-edit
    experiment's, and the hyperparameter changes the edit (the rows differ)."""
    from editlib.methods.registry import make_spec
    from editlib.study.experiments import ExperimentContext, sensitivity, single_edits

    requests = subject_final_requests(3)
    ctx = ExperimentContext(trained_llama2, llama_tokenizer, "tiny", moments2, progress=False)
    overrides = {"mom2_update_weight": 10.0, "targets": {"v_num_grad_steps": 6}}
    frame = sensitivity(ctx, requests, "memit", (1,), overrides, "mom2_update_weight", [0.01, 10.0, 1e6])
    assert frame["value"].tolist() == [0.01, 10.0, 1e6] and set(frame["parameter"]) == {"mom2_update_weight"}
    single = single_edits(ctx, requests, make_spec("memit", overrides, (1,)))
    for metric in ("ES", "PS", "NS", "EM"):
        assert frame.loc[1, metric] == pytest.approx(single.loc[0, metric], abs=1e-9), metric
    assert frame.loc[0, "EM"] != frame.loc[2, "EM"]  # a huge mu barely edits


def test_batched_sensitivity_is_the_batched_experiment_and_emmet_mu_acts_only_on_batches(
        trained_llama2, llama_tokenizer, moments2):
    """With batch sizes, each (value, batch size) row is the batched experiment's at that value;
    EMMET's mu cancels for single edits (D = k^T (mu C)^-1 k) and acts on batches through the ridge
    lambda I of D, so only the batched rows move."""
    from editlib.methods.registry import make_spec
    from editlib.study.experiments import ExperimentContext, batched_edits, sensitivity

    requests = subject_final_requests(4)
    ctx = ExperimentContext(trained_llama2, llama_tokenizer, "tiny", moments2, progress=False)
    overrides = {"mom2_update_weight": 10.0, "emmet_lambda": 0.1, "targets": {"v_num_grad_steps": 6}}
    frame = sensitivity(ctx, requests, "emmet", (1,), overrides, "mom2_update_weight", [0.01, 10.0, 1e4],
                        batch_sizes=[1, 4])
    assert list(zip(frame["value"], frame["batch_size"])) == [(0.01, 1), (0.01, 4), (10.0, 1), (10.0, 4), (1e4, 1), (1e4, 4)]
    assert set(frame["experiment"]) == {"sensitivity"}
    batched, _ = batched_edits(ctx, requests, make_spec("emmet", overrides, (1,)), [4])
    for metric in ("ES", "PS", "NS", "EM", "PM", "NM"):
        assert frame.loc[3, metric] == pytest.approx(batched.loc[0, metric], abs=1e-9), metric
    single, batch = frame[frame["batch_size"] == 1], frame[frame["batch_size"] == 4]
    assert single["EM"].max() - single["EM"].min() < 1e-3
    assert batch["EM"].max() - batch["EM"].min() > 1e-2


class _NoEdits:
    """A session that edits nothing (the cost of evaluation alone)."""

    n_edits = 0
    scores_prompts_once = True

    def apply(self, requests):
        self.n_edits += len(requests)
        return {}

    def scoring(self, requests):
        import contextlib

        return contextlib.nullcontext()

    def state_dict(self):
        return {"n_edits": torch.tensor(self.n_edits)}

    def close(self):
        pass


def test_sequential_evaluation_cost_is_linear_in_the_edits(tiny_llama, llama_tokenizer, monkeypatch):
    """Records scored and generation-entropy evaluations of N single edits: with log-spaced
    eval_at, N + the edited-so-far counts (< 4N), and GE only where all facts edited so far are
    scored; without eval_at, N(N+1)/2 (what editlib.study refuses for long runs)."""
    import dataclasses

    import pandas as pd
    from conftest import make_requests

    import editlib.study.experiments as experiments
    from editlib.methods.grace import GraceHparams
    from editlib.study.experiments import ExperimentContext, sequential_edits
    from editlib.study.stages import log_spaced_counts, sequential_scorings

    scored, generated = [], []  # the counts only: scoring and metrics stubbed
    monkeypatch.setattr(experiments, "score_records", lambda ctx, requests, session: (
        scored.append(len(requests)), pd.DataFrame({"case_id": [r.case_id for r in requests]}))[1])
    monkeypatch.setattr(experiments, "edit_metrics", lambda scores: {"S": float(len(scores))})
    monkeypatch.setattr(experiments, "generation_entropy",
                        lambda model, tokenizer, requests: (generated.append(len(requests)), 1.0)[1])
    ctx = ExperimentContext(tiny_llama, llama_tokenizer, "tiny", {}, progress=False, generation_entropy=True)
    monkeypatch.setattr(ExperimentContext, "session", lambda self, spec: _NoEdits())
    base = make_requests(6)
    for n in (16, 64, 4096):
        requests = [dataclasses.replace(base[i % 6], case_id=i) for i in range(n)]
        eval_at = log_spaced_counts(n)
        scored.clear(), generated.clear()
        frame, _, _ = sequential_edits(ctx, requests, GraceHparams(layers=(1,)), 1, n, eval_at=eval_at)
        assert sum(scored) == sequential_scorings(n, 1, eval_at) == n - len(eval_at) + sum(eval_at) < 4 * n
        assert generated == eval_at  # GE on the edited-so-far evaluations only, of every fact edited so far
        current = frame[frame["scope"] == "current_batch"]
        assert len(current) == n and current["GE"].isna().all()
        assert frame.loc[frame["scope"] == "edited_so_far", "GE"].eq(1.0).all()
        assert frame.loc[frame["scope"] == "edited_so_far", "S"].tolist() == [float(k) for k in eval_at]
    generated.clear()  # GE over at most 4 facts edited so far (evenly spaced) per evaluation
    sequential_edits(ctx, requests[:64], GraceHparams(layers=(1,)), 1, 64, eval_at=log_spaced_counts(64), entropy_records=4)
    assert generated == [1, 2, 4, 4, 4, 4, 4]
    scored.clear()
    sequential_edits(ctx, requests[:16], GraceHparams(layers=(1,)), 1, 16)
    assert sum(scored) == sequential_scorings(16, 1, None) == 16 * 17 // 2
