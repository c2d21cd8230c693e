"""Metrics against hand computations."""

import math

import numpy as np
import pandas as pd
import torch

from editlib.metrics import counterfact_metrics, ngram_entropy, score_continuations, zsre_metrics
from editlib.records import EditRequest


def test_counterfact_metrics_by_hand():
    rows = [
        # record 0: rewrite wins; paraphrases 1 of 2 win; neighbours 2 of 2 keep the truth
        (0, "rewrite", 0, 1.0, 2.0), (0, "paraphrase", 0, 1.0, 3.0), (0, "paraphrase", 1, 2.0, 1.0),
        (0, "neighborhood", 0, 3.0, 1.0), (0, "neighborhood", 1, 2.5, 0.5),
        # record 1: rewrite loses; paraphrase wins; neighbours 0 of 1 keep the truth
        (1, "rewrite", 0, 2.0, 1.0), (1, "paraphrase", 0, 0.5, 1.0), (1, "neighborhood", 0, 1.0, 2.0),
    ]
    scores = pd.DataFrame(rows, columns=["case_id", "kind", "index", "nll_new", "nll_true"])
    m = counterfact_metrics(scores)
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


def test_zsre_token_accuracy_by_hand(tiny_llama, llama_tokenizer):
    # choose as target the model's own greedy 2-token continuation: accuracy 100; a random one: 0 or 50
    prompt = "Where does Kotor work"
    ids = llama_tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        first = int(tiny_llama(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    greedy = llama_tokenizer.decode([first])
    if not greedy.startswith(" ") or not greedy.strip():
        return  # the random model's top token is not a word-initial token; nothing to check
    request = EditRequest(case_id=0, prompt="Where does {} work", subject="Kotor", target_new=greedy.strip(),
                          paraphrase_prompts=(prompt,), neighborhood_prompts=(prompt,), neighborhood_answers=(greedy.strip(),))
    metrics = zsre_metrics(tiny_llama, llama_tokenizer, [request])
    if len(llama_tokenizer(" " + greedy.strip(), add_special_tokens=False)["input_ids"]) == 1:
        assert metrics == {"efficacy": 100.0, "paraphrase": 100.0, "specificity": 100.0}


def test_ngram_entropy_by_hand():
    # words: a b a b -> bigrams (a,b)x2 (b,a)x1: H2 = -(2/3 log2 2/3 + 1/3 log2 1/3); trigrams: 2 distinct, H3 = 1
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert math.isclose(ngram_entropy("a b a b"), (2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("same same same same same") == 0.0
