"""Causal tracing: exact identities of restoring states, and the noise and span bookkeeping."""

import math

import pytest
import torch
from conftest import make_requests

from editlib.eval.tracing import TracingConfig, restored_layers, subject_spans, trace_facts
from editlib.model.forward import final_hidden
from editlib.model.layout import lm_head
from editlib.model.tokens import target_ids


def test_subject_spans_cover_exactly_the_subject_tokens(llama_tokenizer):
    requests = make_requests(6)
    spans = subject_spans(llama_tokenizer, [r.prompt for r in requests], [r.subject for r in requests])
    for request, (start, end) in zip(requests, spans):
        ids = llama_tokenizer(request.text)["input_ids"]
        assert llama_tokenizer.decode(ids[start:end]).strip() == request.subject
        assert start >= 1  # never the BOS


def test_restored_layers_window():
    assert restored_layers("mlp", 5, 1, 12) == [5]
    assert restored_layers("mlp", 5, 4, 12) == [3, 4, 5, 6]
    assert restored_layers("attn", 0, 4, 12) == [0, 1, 2, 3]
    assert restored_layers("mlp", 11, 4, 12) == [9, 10, 11]
    assert restored_layers("hidden", 5, 4, 12) == [5]


@pytest.fixture
def traces(trained_llama2, llama_tokenizer):
    config = TracingConfig(n_samples=3, facts_per_chunk=2)
    return trace_facts(trained_llama2, llama_tokenizer, make_requests(3), config, progress=False)


def test_clean_probability_is_the_models(traces, trained_llama2, llama_tokenizer):
    requests = make_requests(3)
    for request in requests:
        ids = torch.tensor([llama_tokenizer(request.text)["input_ids"]])
        with torch.no_grad():
            hidden = final_hidden(trained_llama2, ids, torch.ones_like(ids))
            probs = torch.softmax(lm_head(trained_llama2)(hidden[0, -1]), -1)
        answer = target_ids(llama_tokenizer, [request.target_true])[0][0]
        p_clean = traces.loc[traces["case_id"] == request.case_id, "p_clean"]
        assert p_clean.nunique() == 1 and math.isclose(p_clean.iloc[0], float(probs[answer]), rel_tol=1e-4)


def test_restoring_the_last_state_recovers_the_clean_probability(traces):
    """The block output at the last token of the last layer is the final hidden state: restoring
    it undoes the corruption exactly."""
    last = traces[(traces["kind"] == "hidden") & (traces["token"] == "last") & (traces["layer"] == 1)]
    assert len(last) == 3
    assert torch.allclose(torch.tensor(last["p_restored"].values), torch.tensor(last["p_clean"].values), atol=1e-5)
    assert torch.allclose(torch.tensor(last["effect"].values),
                          torch.tensor((last["p_clean"] - last["p_corrupted"]).values), atol=1e-5)


def test_corruption_changes_predictions_and_is_seeded(traces, trained_llama2, llama_tokenizer):
    assert (traces["p_corrupted"] != traces["p_clean"]).all()
    again = trace_facts(trained_llama2, llama_tokenizer, make_requests(3), TracingConfig(n_samples=3, facts_per_chunk=3),
                        progress=False)
    # the noise of a fact depends on its position in the list and the seed, not on the chunking
    key = ["case_id", "kind", "token", "layer"]
    again, ordered = again.sort_values(key), traces.sort_values(key)
    assert torch.allclose(torch.tensor(again["p_restored"].values), torch.tensor(ordered["p_restored"].values), atol=1e-5)
    other = trace_facts(trained_llama2, llama_tokenizer, make_requests(3), TracingConfig(n_samples=3, seed=1),
                        progress=False)
    assert not torch.allclose(torch.tensor(other["p_corrupted"].values), torch.tensor(traces["p_corrupted"].values))


def test_trace_table_has_every_kind_token_and_layer(traces):
    assert len(traces) == 3 * 3 * 2 * 2  # facts x kinds x tokens x layers
    assert set(traces["kind"]) == {"hidden", "mlp", "attn"} and set(traces["token"]) == {"subject_last", "last"}
