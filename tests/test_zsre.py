"""ZsRE as an editing set: records from every source, experiments that score them by token
accuracy, and rows that say which records they measured."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_requests

from editlib.data.records import ZSRE_LOC_PREFIX, load_requests, parse_records, zsre_record
from editlib.eval.metrics import zsre_metrics, zsre_scores
from editlib.methods.registry import make_spec
from editlib.study.experiments import ExperimentContext, batched_edits, sequential_edits, single_edits
from editlib.study.pipeline import prepare_data, read_records
from editlib.study.stages import edit_records


def zsre_requests(n: int = 4, target: str = "alt"):
    records = [zsre_record(r) for r in make_requests(n)]
    return parse_records(records, kind="zsre", zsre_target=target)


def test_a_counterfact_fact_in_zsre_form_edits_the_same_fact():
    cf, zsre = make_requests(2), zsre_requests(2)
    for a, b in zip(cf, zsre):
        assert (b.text, b.target_new, b.target_true, b.source) == (a.text, a.target_new, a.target_true, "zsre")
        assert b.neighborhood_prompts == (a.neighborhood_prompts[0],) and b.neighborhood_answers == (a.target_true,)
    answers = zsre_requests(2, target="answers")  # MEMIT / UME: edit towards answers[0], no true object
    assert [(r.target_new, r.target_true) for r in answers] == [(a.target_true, None) for a in cf]
    nq = parse_records([{**zsre_record(cf[0]), "loc": ZSRE_LOC_PREFIX + "who wrote it"}], kind="zsre")[0]
    assert nq.neighborhood_prompts == ("who wrote it?",)  # an NQ question is asked with "?"


def test_zsre_scores_are_token_accuracies_per_prompt(tiny_llama, llama_tokenizer):
    requests = zsre_requests(3)
    scores = zsre_scores(tiny_llama, llama_tokenizer, requests)
    assert scores.groupby("kind").size().to_dict() == {"neighborhood": 3, "paraphrase": 3, "rewrite": 3}
    assert scores["acc"].between(0, 1).all()
    by_kind = scores.groupby(["case_id", "kind"])["acc"].mean().unstack()
    metrics = zsre_metrics(tiny_llama, llama_tokenizer, requests)
    assert metrics["efficacy"] == pytest.approx(100 * by_kind["rewrite"].mean())
    assert metrics["specificity"] == pytest.approx(100 * by_kind["neighborhood"].mean())


def test_single_edits_on_zsre_equal_each_edit_scored_alone(trained_llama2, llama_tokenizer, moments2):
    requests = zsre_requests(4)
    ctx = ExperimentContext(trained_llama2, llama_tokenizer, "tiny", moments2, progress=False)
    spec = make_spec("memit", {"mom2_update_weight": 1.0, "targets": {"v_num_grad_steps": 5}}, (1,))
    row = single_edits(ctx, requests, spec).iloc[0]
    assert row["records"] == "zsre" and np.isnan(row["EM"]) and np.isnan(row["EM_lo"])
    by_hand = []
    session = ctx.session(spec)
    for request in session.one_at_a_time(requests):
        by_hand.append(zsre_metrics(trained_llama2, llama_tokenizer, [request]))
    session.close()
    assert row["ES"] == pytest.approx(np.mean([m["efficacy"] for m in by_hand]))
    assert row["PS"] == pytest.approx(np.mean([m["paraphrase"] for m in by_hand]))
    assert row["NS"] == pytest.approx(np.mean([m["specificity"] for m in by_hand]))
    assert row["ES_lo"] <= row["ES"] <= row["ES_hi"]
    batched, _ = batched_edits(ctx, requests, spec, [1, 2])
    sequential, _, _ = sequential_edits(ctx, requests, spec, batch_size=2, total_edits=4)
    assert set(batched["records"]) == set(sequential["records"]) == {"zsre"}


def test_prepare_data_writes_the_configured_records(tmp_path):
    base = {"seed": 0, "data": {"source": "toyworld", "world": {"seed": 0, "n_subjects": 20}}}
    for kind in ("counterfact", "zsre"):
        config = {**base, "data": {**base["data"], "records": kind, "zsre_target": "alt"}}
        config["records"] = edit_records(config)
        prepare_data(config, tmp_path / kind)
        requests = read_records(config, tmp_path / kind / "records.json")
        assert {r.source for r in requests} == {kind}
    cf = load_requests(tmp_path / "counterfact" / "records.json")
    zsre = read_records({"records": {"kind": "zsre", "zsre_target": "alt"}}, tmp_path / "zsre" / "records.json")
    assert [(r.subject, r.target_new, r.target_true) for r in zsre] == [(r.subject, r.target_new, r.target_true) for r in cf]
    assert json.loads((tmp_path / "zsre" / "records.json").read_text())[0]["src"].endswith("?")  # questions
