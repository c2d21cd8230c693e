"""Metrics against hand computations."""

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from editlib.data.records import EditRequest
from editlib.eval.metrics import edit_metrics, ngram_entropy, score_continuations, zsre_metrics


def test_counterfact_metrics_by_hand():
    rows = [
        # record 0: rewrite wins; paraphrases 1 of 2 win; neighbours 2 of 2 keep the truth
        (0, "rewrite", 0, 1.0, 2.0), (0, "paraphrase", 0, 1.0, 3.0), (0, "paraphrase", 1, 2.0, 1.0),
        (0, "neighborhood", 0, 3.0, 1.0), (0, "neighborhood", 1, 2.5, 0.5),
        # record 1: rewrite loses; paraphrase wins; neighbours 0 of 1 keep the truth
        (1, "rewrite", 0, 2.0, 1.0), (1, "paraphrase", 0, 0.5, 1.0), (1, "neighborhood", 0, 1.0, 2.0),
    ]
    scores = pd.DataFrame(rows, columns=["case_id", "kind", "index", "nll_new", "nll_true"])
    m = edit_metrics(scores)
    e = math.exp
    assert m["ES"] == 50.0
    assert m["PS"] == 100 * (0.5 + 1.0) / 2
    assert m["NS"] == 100 * (1.0 + 0.0) / 2
    assert math.isclose(m["EM"], 100 * ((e(-1) - e(-2)) + (e(-2) - e(-1))) / 2)
    pm0 = ((e(-1) - e(-3)) + (e(-2) - e(-1))) / 2
    assert math.isclose(m["PM"], 100 * (pm0 + (e(-0.5) - e(-1))) / 2)
    nm0 = ((e(-1) - e(-3)) + (e(-0.5) - e(-2.5))) / 2
    assert math.isclose(m["NM"], 100 * (nm0 + (e(-2) - e(-1))) / 2)
    assert math.isclose(m["S"], 3 / (1 / 50 + 1 / 75 + 1 / 50))


def test_score_continuations_scores_target_not_bos(tiny_llama, llama_tokenizer):
    prompt, target = "The mother tongue of Kotor is", "English"
    nll, hit = score_continuations(tiny_llama, llama_tokenizer, [prompt, "x"], [target, "Paris"])
    p_ids = llama_tokenizer(prompt)["input_ids"]
    t_ids = llama_tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    logp = torch.log_softmax(tiny_llama(input_ids=torch.tensor([p_ids + t_ids])).logits[0], -1)
    expected = -np.mean([float(logp[len(p_ids) - 1 + j, t]) for j, t in enumerate(t_ids)])
    assert abs(nll[0] - expected) < 1e-5
    predicted = [int(logp[len(p_ids) - 1 + j].argmax()) for j in range(len(t_ids))]
    assert hit[0] == (predicted == t_ids)


def hand_accuracy(model, tokenizer, prompt: str, answer: str) -> float:
    """100 x the fraction of " " + answer's tokens that are the teacher-forced argmax."""
    p_ids = tokenizer(prompt)["input_ids"]
    t_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p_ids + t_ids])).logits[0]
    return 100.0 * float(np.mean([int(logits[len(p_ids) - 1 + j].argmax()) == t for j, t in enumerate(t_ids)]))


def test_zsre_token_accuracy_by_hand(tiny_llama, llama_tokenizer):
    # make the model predict one word after the known record's prompt (the only non-zero output row
    # is that word's, aligned with the prompt's final hidden state): its efficacy is 100; every
    # value is also computed by hand; prompts are averaged per record, then over records
    words = [w for w in ("is", "of", "the", "and", "in") if len(llama_tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    assert words, "no single-token word in the test vocabulary"
    word = words[0]
    known = EditRequest(case_id=0, prompt="Where does {} work", subject="Kotor", target_new=word,
                        paraphrase_prompts=("Kotor works in", "Kotor is"), neighborhood_prompts=("The capital is",),
                        neighborhood_answers=("Paris",))
    other = EditRequest(case_id=1, prompt="{} speaks", subject="Lena", target_new="English Paris",
                        paraphrase_prompts=("Lena talks",), neighborhood_prompts=("Where is Rome",),
                        neighborhood_answers=("Italy",))
    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        hidden = model.model(**llama_tokenizer(known.text, return_tensors="pt")).last_hidden_state[0, -1]
        model.lm_head.weight.zero_()
        model.lm_head.weight[llama_tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]] = hidden
    metrics = zsre_metrics(model, llama_tokenizer, [known, other], max_rows=2)
    hand = lambda prompt, answer: hand_accuracy(model, llama_tokenizer, prompt, answer)  # noqa: E731
    assert hand(known.text, known.target_new) == 100.0
    expected = {
        "efficacy": np.mean([hand(r.text, r.target_new) for r in (known, other)]),
        "paraphrase": np.mean([np.mean([hand(p, r.target_new) for p in r.paraphrase_prompts]) for r in (known, other)]),
        "specificity": np.mean([hand(r.neighborhood_prompts[0], r.neighborhood_answers[0]) for r in (known, other)]),
    }
    assert metrics == pytest.approx(expected)
    assert metrics["efficacy"] >= 50.0


def test_ngram_entropy_by_hand():
    # words: a b a b -> bigrams (a,b)x2 (b,a)x1: H2 = -(2/3 log2 2/3 + 1/3 log2 1/3); trigrams: 2 distinct, H3 = 1
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert math.isclose(ngram_entropy("a b a b"), (2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("same same same same same") == 0.0


def _random_scores(n_records: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for case in range(n_records):
        for kind, count in (("rewrite", 1), ("paraphrase", 2), ("neighborhood", 3)):
            for index in range(count):
                rows.append((case, kind, index, rng.exponential(), rng.exponential()))
    return pd.DataFrame(rows, columns=["case_id", "kind", "index", "nll_new", "nll_true"])


def test_bootstrap_intervals_match_a_direct_resampling():
    from editlib.eval.metrics import bootstrap_intervals, harmonic_mean, per_record_metrics

    scores = _random_scores(40, seed=1)
    per_record = per_record_metrics(scores)
    m = edit_metrics(scores, n_boot=500, seed=7)
    # the same resamples drawn by hand, one record index vector per draw
    draws = np.random.default_rng(7).integers(0, 40, size=(500, 40))
    es = [per_record["ES"].to_numpy()[d].mean() for d in draws]
    s = [harmonic_mean([per_record[c].to_numpy()[d].mean() for c in ("ES", "PS", "NS")]) for d in draws]
    assert np.allclose((m["ES_lo"], m["ES_hi"]), np.percentile(es, [2.5, 97.5]))
    assert np.allclose((m["S_lo"], m["S_hi"]), np.percentile(s, [2.5, 97.5]))
    for name in ("ES", "PS", "NS", "EM", "PM", "NM", "S"):
        assert m[f"{name}_lo"] <= m[name] <= m[f"{name}_hi"], name
    assert bootstrap_intervals(per_record, n_boot=500, seed=7) == bootstrap_intervals(per_record, n_boot=500, seed=7)


def test_bootstrap_interval_narrows_with_more_records():
    few = edit_metrics(_random_scores(20, seed=2))
    many = edit_metrics(_random_scores(500, seed=2))
    assert many["NS_hi"] - many["NS_lo"] < few["NS_hi"] - few["NS_lo"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3-window-512", "gemma3-window-4", "toy-local"])
def test_prompts_scored_once_equal_whole_rows(arch, llama_tokenizer, gpt2_tokenizer):
    """Each distinct prompt run once into a key/value cache, its targets as continuations, gives the
    per-token NLL and argmax hits of scoring every prompt + target row whole (one-token prompts,
    repeated prompts, multi-token targets and a sliding window shorter than the rows included)."""
    from conftest import make_gpt2, make_llama
    from test_values import _gemma3, _toy_local

    from editlib.eval.metrics import teacher_forced

    tokenizer = gpt2_tokenizer if arch == "gpt2" else llama_tokenizer
    model = {"llama": lambda: make_llama(tokenizer), "gpt2": lambda: make_gpt2(tokenizer),
             "gemma3-window-512": lambda: _gemma3(tokenizer, 512), "gemma3-window-4": lambda: _gemma3(tokenizer, 4),
             "toy-local": lambda: _toy_local(tokenizer)}[arch]()
    prompts = ["The capital of France is", "x", "Some longer words here and then the capital of Spain is",
               "The capital of France is", "Because of that, the city"]
    targets = ["Paris", "Madrid city", "Rome", "Berlin and more", "is"]
    shared = teacher_forced(model, tokenizer, prompts + prompts, targets + targets[::-1], max_rows=2)
    whole = teacher_forced(model, tokenizer, prompts + prompts, targets + targets[::-1], max_rows=2,
                           share_prompts=False)
    assert [len(n) for n in shared[0]] == [len(n) for n in whole[0]] and max(len(n) for n in whole[0]) > 1
    for (nll_a, hit_a), nll_b, hit_b in zip(zip(*shared), *whole):
        np.testing.assert_allclose(nll_a, nll_b, rtol=1e-5, atol=1e-5)
        assert (hit_a == hit_b).all()
