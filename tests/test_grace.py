"""GRACE: edits take, unrelated inputs are untouched bit for bit, base weights never move,
removal is exact, and the codebook's split / coverage rules behave as docs/methods.md §5.6 says."""

import pandas.testing as pd_testing
import pytest
import torch
from conftest import make_llama

from editlib.data.records import EditRequest
from editlib.methods.grace import GraceHparams
from editlib.methods.grace.session import GraceCodebook, GraceEditor, last_token_positions
from editlib.model.tokens import target_argmax_correct, target_batch
from editlib.toy.vocab import train_bpe_tokenizer

FACTS = [  # prompt, subject, target_new, target_true
    ("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    ("{} plays the", "Toko Yasuda", "piano", "guitar"),
    ("The capital city of {} is", "Norway", "Berlin", "Oslo"),
    ("{} was born in", "Ada Lovelace", "Paris", "London"),
]
UNRELATED = ["The weather today is", "My favourite colour is", "Numbers such as seven are"]
LAYER = 0
MODULE = f"model.layers.{LAYER}.mlp.down_proj"


@pytest.fixture(scope="module")
def tokenizer():
    texts = [p.format(s) + " " + t for p, s, new, true in FACTS for t in (new, true)]
    targets = " ".join(t for fact in FACTS for t in fact[2:])
    return train_bpe_tokenizer(texts * 4 + UNRELATED + [targets] * 20, vocab_size=600)


@pytest.fixture(scope="module")
def requests():
    return [EditRequest(case_id=i, prompt=p, subject=s, target_new=new, target_true=true) for i, (p, s, new, true) in enumerate(FACTS)]


def tiny_llama(tokenizer, seed=0):
    """2-layer random Llama; initializer_range 0.1 puts distinct prompts ~5 apart at the MLP input."""
    return make_llama(tokenizer, layers=2, seed=seed, frozen=False, num_key_value_heads=4,
                      max_position_embeddings=64, initializer_range=0.1)


def edit_success(model, editor, tokenizer, requests):
    """(B,) teacher-forced argmax success of target_new, querying each row's last prompt token."""
    batch = target_batch(tokenizer, [r.text for r in requests], [r.target_new for r in requests])
    with torch.no_grad(), editor.query_positions(batch.last_prompt_positions):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return target_argmax_correct(logits, batch.labels)


def logits_of(model, tokenizer, texts):
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**encoded).logits


def test_targets_are_single_tokens(tokenizer):
    # Greedy next-token success below is then the whole target, not only its first token.
    for fact in FACTS:
        assert len(tokenizer(" " + fact[2], add_special_tokens=False)["input_ids"]) == 1


def test_sequential_edits_make_target_new_the_greedy_continuation(tokenizer, requests):
    model = tiny_llama(tokenizer)
    editor = GraceEditor(model, tokenizer, MODULE)
    assert not edit_success(model, editor, tokenizer, requests).any()
    editor.edit(requests[:2])
    editor.edit(requests[2:])  # the first two must survive the second call
    assert editor.num_keys == 4
    assert edit_success(model, editor, tokenizer, requests).all()


def test_unrelated_rows_are_bit_identical_even_beside_an_edited_row(tokenizer, requests):
    model = tiny_llama(tokenizer)
    texts = [requests[0].text] + UNRELATED  # right padded, different lengths: per-row query positions
    before = logits_of(model, tokenizer, texts)
    editor = GraceEditor(model, tokenizer, MODULE)
    editor.edit(requests[:1])
    after = logits_of(model, tokenizer, texts)
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    assert encoded["attention_mask"][1:].sum(1).ne(encoded["attention_mask"][0].sum()).any()
    for row in range(1, len(texts)):
        assert torch.equal(after[row], before[row])
    assert not torch.equal(after[0], before[0])


def test_unrelated_queries_lie_outside_the_radius(tokenizer, requests):
    # Precondition of the bit-identity test: deferral happens because d* > eps, not by accident.
    model = tiny_llama(tokenizer)
    editor = GraceEditor(model, tokenizer, MODULE)
    editor.edit(requests[:1])
    batch = target_batch(tokenizer, UNRELATED, ["x"] * len(UNRELATED))
    queries, _ = editor.edit_token_activations(batch)
    distance, nearest = editor.codebook.nearest(queries)
    assert (distance > editor.codebook.epsilons[nearest]).all()


def test_base_parameters_never_change(tokenizer, requests):
    model = tiny_llama(tokenizer)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    editor = GraceEditor(model, tokenizer, MODULE, GraceHparams(val_init="warm", n_iter=5))
    editor.edit(requests)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_remove_restores_the_original_model_exactly(tokenizer, requests):
    model = tiny_llama(tokenizer)
    texts = [r.text for r in requests] + UNRELATED
    before = logits_of(model, tokenizer, texts)
    editor = GraceEditor(model, tokenizer, MODULE, GraceHparams(replacement="replace_all", n_iter=5))
    editor.edit(requests)
    assert not torch.equal(logits_of(model, tokenizer, texts), before)
    editor.remove()
    assert torch.equal(logits_of(model, tokenizer, texts), before)
    assert not model.get_submodule(MODULE)._forward_hooks and not model.model._forward_pre_hooks


def test_save_and_load_reproduce_the_edited_model(tokenizer, requests, tmp_path):
    model = tiny_llama(tokenizer)
    editor = GraceEditor(model, tokenizer, MODULE, GraceHparams(n_iter=5))
    editor.edit(requests)
    texts = [r.text for r in requests] + UNRELATED
    edited = logits_of(model, tokenizer, texts)
    editor.save(tmp_path / "codebook.safetensors")
    fresh = tiny_llama(tokenizer)
    loaded = GraceEditor.load(fresh, tokenizer, tmp_path / "codebook.safetensors")
    assert loaded.codebook.labels == editor.codebook.labels and loaded.hparams == editor.hparams
    assert torch.equal(logits_of(fresh, tokenizer, texts), edited)


def test_split_halves_both_radii_when_labels_differ():
    codebook = GraceCodebook(key_dim=3, value_dim=2, init_eps=1.0)
    codebook.add(torch.zeros(3), torch.zeros(2), "Paris")
    index, action = codebook.absorb(torch.tensor([1.5, 0.0, 0.0]), "Rome", torch.ones(2))  # 1.5 <= 1.0 + 1.0
    assert (action, index, len(codebook)) == ("split", 1, 2)
    assert codebook.epsilons[0].item() == pytest.approx(0.75 - 1e-5)
    assert codebook.epsilons[1].item() == pytest.approx(0.75)
    _, action = codebook.absorb(torch.tensor([0.0, 5.0, 0.0]), "Rome", torch.ones(2))  # beyond eps_init + eps
    assert action == "add" and codebook.epsilons[2].item() == 1.0 and len(codebook) == 3


def test_coverage_grows_the_radius_when_labels_match():
    codebook = GraceCodebook(key_dim=3, value_dim=2, init_eps=1.0)
    codebook.add(torch.zeros(3), torch.zeros(2), "Paris")
    index, action = codebook.absorb(torch.tensor([0.0, 1.5, 0.0]), "Paris", torch.ones(2))
    assert (index, action, len(codebook)) == (0, "expand", 1)
    assert codebook.epsilons[0].item() == pytest.approx(1.5)
    index, action = codebook.absorb(torch.tensor([0.0, 0.5, 0.0]), "Paris", torch.ones(2))
    assert (index, action, len(codebook)) == (0, "covered", 1) and codebook.epsilons[0].item() == pytest.approx(1.5)


def test_default_query_is_each_rows_last_attended_token():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    assert last_token_positions(mask, 3, 4).tolist() == [3, 1, 0]
    assert last_token_positions(None, 2, 5).tolist() == [4, 4]
    assert last_token_positions(torch.ones(2, 7), 2, 1).tolist() == [0, 0]  # KV cache: the newest token


def test_a_batched_edit_equals_editing_one_request_at_a_time(tokenizer, requests):
    hparams = GraceHparams(n_iter=10)
    batched = GraceEditor(tiny_llama(tokenizer), tokenizer, MODULE, hparams)
    batched.edit(requests[:2])
    sequential = GraceEditor(tiny_llama(tokenizer), tokenizer, MODULE, hparams)
    for request in requests[:2]:
        sequential.edit([request])
    torch.testing.assert_close(batched.codebook.keys, sequential.codebook.keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched.codebook.values, sequential.codebook.values, rtol=1e-4, atol=1e-4)


def test_prompt_queries_find_each_rows_prompt_end_in_reordered_batches(tokenizer, requests):
    model = tiny_llama(tokenizer)
    editor = GraceEditor(model, tokenizer, MODULE, GraceHparams(n_iter=10))
    editor.edit(requests[:2])
    order = [3, 0, 2, 1]  # scoring code may sort rows by length: positions must follow the ids
    batch = target_batch(tokenizer, [requests[i].text for i in order], [requests[i].target_new for i in order])
    with torch.no_grad():
        with editor.query_positions(batch.last_prompt_positions):
            expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        with editor.prompt_queries([r.text for r in requests]):
            actual = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        unscoped = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(actual, expected)
    assert target_argmax_correct(actual, batch.labels).tolist() == [False, True, False, True]
    assert not target_argmax_correct(unscoped, batch.labels).any()  # last-token default misses the edit


def test_experiment_scoring_of_a_grace_edit_scores_whole_rows(tokenizer, requests):
    """score_records scores a GRACE session's rows whole (each prompt's last token queried): the
    numbers equal whole-row scoring under the session's prompt queries and the edit is visible
    (prompt_queries matches rows by their prompt, which a cached prefix would cut off)."""
    from editlib.eval.metrics import counterfact_scores
    from editlib.methods.registry import make_spec
    from editlib.study.experiments import ExperimentContext, score_records

    model = tiny_llama(tokenizer)
    ctx = ExperimentContext(model, tokenizer, "tiny", {}, progress=False)
    session = ctx.session(make_spec("grace", {"n_iter": 10}, (LAYER,)))
    try:
        session.apply(requests[:2])
        scores = score_records(ctx, requests[:2], session)
        with session.scoring(requests[:2]):
            whole = counterfact_scores(model, tokenizer, requests[:2], share_prompts=False)
    finally:
        session.close()
    pd_testing.assert_frame_equal(scores, whole)
    rewrite = scores[scores["kind"] == "rewrite"]
    assert (rewrite["nll_new"] < rewrite["nll_true"]).all()


def test_training_above_the_edited_block_equals_whole_model_training(tokenizer, requests):
    """The own-blocks path (prefix cached, blocks above run by editlib.model.upper_blocks) trains the same
    values, with the same per-step losses, as forward passes of the whole model through the hooks,
    also when later requests of a batch split earlier ones' keys (prompts ~5 apart, radius 3)."""
    hparams = GraceHparams(n_iter=8, eps=3.0)
    fast = GraceEditor(tiny_llama(tokenizer), tokenizer, MODULE, hparams)
    slow = GraceEditor(tiny_llama(tokenizer), tokenizer, MODULE, hparams, own_blocks=False)
    assert fast._trains_above() and not slow._trains_above()
    for chunk, actions in ((requests[:3], ["add", "split", "split"]), (requests[3:], ["split"])):
        fast_report, slow_report = fast.edit(chunk), slow.edit(chunk)
        assert fast_report["action"] == slow_report["action"] == actions
        for key in ("nll_first_step", "nll_final"):
            torch.testing.assert_close(torch.tensor(fast_report[key]), torch.tensor(slow_report[key]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.codebook.values, slow.codebook.values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.codebook.epsilons, slow.codebook.epsilons)
