"""MEND: a fresh hypernetwork is one plain gradient step, batched single edits equal one-by-one
edits, training lowers the held-out edit loss, and the hypernetwork survives a save/load."""

import random

import pytest
import torch
from conftest import make_llama

from editlib.data.records import EditRequest
from editlib.methods.mend import MendHparams
from editlib.methods.mend.editor import MendEditor, RunningMoments, added_deltas, batch_target_nll, train_mend
from editlib.model.tokens import target_batch
from editlib.toy.vocab import train_bpe_tokenizer

RELATIONS = [  # prompt, two paraphrases
    ("The mother tongue of {} is", "{} speaks the language", "In daily life {} speaks"),
    ("{} plays the", "The instrument of {} is the", "On stage {} plays the"),
    ("{} was born in", "The birthplace of {} is", "{} grew up in"),
    ("{} works for", "The employer of {} is", "Every day {} goes to work at"),
]
TARGETS = ["English", "French", "piano", "guitar", "Paris", "London", "Google", "Nokia", "Berlin", "violin", "Spanish", "Apple"]
SUBJECTS = ["Ada", "Boris", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kofi", "Lena"]
EDITED = ("model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj")


@pytest.fixture(scope="module")
def tokenizer():
    texts = [t.format(s) for s in SUBJECTS for relation in RELATIONS for t in relation]
    return train_bpe_tokenizer(texts + [" ".join(TARGETS)] * 20, vocab_size=800)


@pytest.fixture(scope="module")
def requests():
    """48 synthetic CounterFact-style requests (shuffled), with paraphrases and neighborhood prompts."""
    rng = random.Random(0)
    out = []
    for i, subject in enumerate(SUBJECTS):
        for j, (prompt, *paraphrases) in enumerate(RELATIONS):
            new, true = rng.sample(TARGETS, 2)
            others = rng.sample([s for s in SUBJECTS if s != subject], 2)
            out.append(
                EditRequest(
                    case_id=f"{i}-{j}", prompt=prompt, subject=subject, target_new=new, target_true=true,
                    paraphrase_prompts=tuple(p.format(subject) for p in paraphrases),
                    neighborhood_prompts=tuple(prompt.format(s) for s in others),
                )
            )
    rng.shuffle(out)
    return out


def tiny_llama(tokenizer, seed=0):
    return make_llama(tokenizer, layers=3, seed=seed, frozen=False, num_key_value_heads=4,
                      max_position_embeddings=64, initializer_range=0.1)


TINY = MendHparams(modules=EDITED, rank=32, lr=1e-3, lr_lr=1e-2, edit_lr=1e-3, batch_size=4, steps=10, log_every=10)


def test_fresh_hypernetwork_is_one_plain_gradient_step(tokenizer, requests):
    model = tiny_llama(tokenizer)
    editor = MendEditor.fresh(model, tokenizer, MendHparams(modules=EDITED, rank=32, edit_lr=0.5))
    edit = requests[:3]
    deltas = editor.module_deltas(edit)
    weights = [model.get_submodule(name).weight for name in EDITED]
    batch = target_batch(tokenizer, [r.text for r in edit], [r.target_new for r in edit])
    with torch.enable_grad():
        loss = batch_target_nll(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels)
        grads = torch.autograd.grad(loss, weights)
    for name, grad in zip(EDITED, grads):
        assert grad.abs().max() > 0
        torch.testing.assert_close(deltas[name], -0.5 * grad, rtol=1e-4, atol=1e-7)


def test_separate_deltas_equal_one_edit_at_a_time(tokenizer, requests):
    # The batched evaluation path must be exactly the per-request edit.
    model = tiny_llama(tokenizer)
    editor = train_mend(model, tokenizer, requests[:8], MendHparams(**{**TINY.__dict__, "steps": 3, "log_every": 3}))
    batched = editor.module_deltas(requests[8:11], separately=True)
    for index, request in enumerate(requests[8:11]):
        single = editor.module_deltas([request])
        for name in EDITED:
            torch.testing.assert_close(batched[name][index], single[name], rtol=1e-4, atol=1e-6)


def test_added_deltas_equal_editing_the_weights(tokenizer, requests):
    model = tiny_llama(tokenizer)
    editor = MendEditor.fresh(model, tokenizer, MendHparams(modules=EDITED, rank=32, edit_lr=0.5))
    batch = target_batch(tokenizer, [r.text for r in requests[:4]], [r.target_new for r in requests[:4]])
    with torch.no_grad():
        deltas = editor.module_deltas(requests[:2])
        with added_deltas(model, deltas):
            functional = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        original = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        with editor.applied(requests[:2]):
            in_place = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        restored = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(functional, in_place, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(functional, original)
    assert torch.equal(restored, original)


def test_edit_changes_only_the_edited_weights_and_returns_their_deltas(tokenizer, requests):
    model = tiny_llama(tokenizer)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    editor = MendEditor.fresh(model, tokenizer, MendHparams(modules=EDITED, rank=32, edit_lr=0.5))
    deltas = editor.edit(requests[:2])
    assert set(deltas) == {f"{name}.weight" for name in EDITED}
    for name, tensor in model.state_dict().items():
        if name in deltas:
            torch.testing.assert_close(tensor - before[name], deltas[name], rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(tensor, before[name])


def test_training_lowers_the_held_out_edit_loss(tokenizer, requests):
    model = tiny_llama(tokenizer)
    weights = {name: model.get_submodule(name).weight.clone() for name in EDITED}
    editor = train_mend(model, tokenizer, requests[:40], TINY, eval_requests=requests[40:])
    first, last = editor.history[0], editor.history[-1]
    assert (first["step"], last["step"]) == (0, TINY.steps)
    assert first["edit_nll"] > 5.0  # step 0: alpha = 1e-3, the edit barely moves the model
    assert last["edit_nll"] < first["edit_nll"] - 2.0
    assert last["edit_success"] > first["edit_success"]
    assert all(torch.equal(model.get_submodule(name).weight, weights[name]) for name in EDITED)


def test_save_load_round_trip_gives_identical_deltas(tokenizer, requests, tmp_path):
    model = tiny_llama(tokenizer)
    editor = train_mend(model, tokenizer, requests[:8], MendHparams(**{**TINY.__dict__, "steps": 3, "log_every": 3}))
    editor.save(tmp_path / "mend.safetensors")
    loaded = MendEditor.load(model, tokenizer, tmp_path / "mend.safetensors")
    assert loaded.hparams == editor.hparams and loaded.history == editor.history
    with torch.no_grad():
        expected, actual = editor.module_deltas(requests[8:10]), loaded.module_deltas(requests[8:10])
    assert all(torch.equal(actual[name], expected[name]) for name in EDITED)


def test_running_moments_match_the_pooled_mean_and_variance():
    moments = RunningMoments(5)
    chunks = [torch.randn(n, 5) * 3 + 1 for n in (1, 7, 30)]
    for chunk in chunks:
        moments.update(chunk)
    pooled = torch.cat(chunks)
    torch.testing.assert_close(moments.mean, pooled.mean(0))
    expected = (pooled - pooled.mean(0)) / (pooled.std(0) + 1e-7)
    torch.testing.assert_close(moments.normalise(pooled), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(RunningMoments(5).normalise(pooled), pooled)  # identity before any data


# ---------------------------------------------------------------------------- memory: chunked rows, target-position logits


def _reference_deltas(editor, requests, separately):
    """The hypernetwork's deltas from gradients of full (rows x positions x vocab) logits."""
    from editlib.methods.mend.editor import Factors
    from editlib.model.tokens import target_nll

    model, names = editor.model, editor.hypernet.module_names
    batch = editor.edit_batch(requests)
    captured = {}

    def hook(module, args, output, name):
        captured[name] = (args[0].detach(), output if output.requires_grad else output.detach().requires_grad_(True))
        return captured[name][1]

    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
    with torch.enable_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = target_nll(logits, batch.labels).sum() if separately else batch_target_nll(logits, batch.labels)
        grads = torch.autograd.grad(loss, [captured[n][1] for n in names])
    for handle in handles:
        handle.remove()
    rows = torch.arange(len(requests)).repeat_interleave(batch.input_ids.shape[1])
    factors = {n: Factors(captured[n][0].flatten(0, 1).float(), g.flatten(0, 1).float(), rows) for n, g in zip(names, grads)}
    with torch.no_grad():
        return editor.hypernet(factors, n_rows=len(requests) if separately else None)


@pytest.mark.parametrize("separately", [False, True])
def test_chunked_edit_gradients_equal_the_full_logits_computation(tokenizer, requests, separately):
    from editlib.methods.mend.editor import gradient_factors, row_chunks

    model = tiny_llama(tokenizer)
    editor = MendEditor.fresh(model, tokenizer, TINY)
    batch = editor.edit_batch(requests[:12])
    lengths = batch.attention_mask.sum(1).tolist()
    assert len(row_chunks(lengths, 30)) >= 4  # 30 positions: 2-3 rows per chunk
    expected = _reference_deltas(editor, requests[:12], separately)
    for max_tokens in (30, 10**6):
        factors = gradient_factors(model, EDITED, batch, separately, max_tokens=max_tokens)
        with torch.no_grad():
            deltas = editor.hypernet(factors, n_rows=12 if separately else None)
        for name in EDITED:
            torch.testing.assert_close(deltas[name], expected[name], rtol=1e-5, atol=1e-9)


def test_chunked_training_step_and_evaluation_equal_one_chunk(tokenizer, requests):
    from editlib.methods.mend.editor import evaluate_mend, locality_prompts, mend_step

    model = tiny_llama(tokenizer)
    batch, loc = requests[:6], locality_prompts(requests[:6], requests[:40], 2, random.Random(0))
    # a step updates the normaliser's moments: each from a fresh (identical) hypernetwork
    whole = mend_step(MendEditor.fresh(model, tokenizer, TINY), batch, loc, max_tokens=10**6)
    editor = MendEditor.fresh(model, tokenizer, TINY)
    chunked = mend_step(editor, batch, loc, max_tokens=25)
    for a, b in zip(whole[0], chunked[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert chunked[1:] == pytest.approx(whole[1:], rel=1e-5)
    one_pass = evaluate_mend(editor, requests[30:])
    assert evaluate_mend(editor, requests[30:], max_tokens=25) == pytest.approx(one_pass, rel=1e-5)
    # the held-out requests' own deltas in groups of 5 (of 18): 5 x 2 modules x 64 x 128 floats
    assert evaluate_mend(editor, requests[30:], max_delta_floats=5 * 2 * 64 * 128 + 1) == pytest.approx(one_pass, rel=1e-5)


def test_the_largest_logits_tensor_is_bounded_by_the_token_budget(tokenizer, requests, monkeypatch):
    """A batch of 24 edits, its training step and held-out evaluation with a budget of 32 positions:
    the head never runs on more than 32 positions at once (the full batch has ~24 x 12)."""
    import editlib.methods.mend.editor as mend

    monkeypatch.setattr(mend, "LOGIT_TOKENS", 32)
    model = tiny_llama(tokenizer)
    shapes = []
    model.lm_head.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    editor = MendEditor.fresh(model, tokenizer, TINY)
    batch = editor.edit_batch(requests[:24])
    assert batch.input_ids.numel() > 5 * 32
    with editor.applied(requests[:24]):
        pass
    mend.mend_step(editor, requests[:8], mend.locality_prompts(requests[:8], requests, 2, random.Random(0)))
    mend.evaluate_mend(editor, requests[:24])
    vocab = model.config.vocab_size
    assert shapes and all(len(shape) == 2 and shape[0] <= 32 and shape[1] == vocab for shape in shapes), set(shapes)
