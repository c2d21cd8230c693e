"""Downstream evaluation through lm-eval on an in-memory model: tiny Llama, local MC tasks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_llama
from transformers import LlamaForCausalLM

from editlib.eval.downstream import evaluate_downstream, hub_offline, item_rows, lm_eval_results, metric_rows
from editlib.data.downstream_tasks import glue_eval_items, write_glue_eval_task, write_mc_task, write_perplexity_task
from editlib.io import write_jsonl
from editlib.toy.vocab import train_bpe_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CORPUS = [
    "Question: What colour is the sky on a clear day?\nAnswer: blue",
    "The capital of France is Paris and the capital of Italy is Rome.",
    "Review : a gripping story with thrilling performances\nSentiment : positive",
    "Cats and dogs are animals; oak and pine are trees.",
    "Two plus two is four, three plus three is six.",
]

MC_ITEMS = [
    {"question": "Question: What colour is the sky on a clear day?\nAnswer:", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "Question: What is the capital of France?\nAnswer:", "choices": ["Rome", "Paris", "Berlin", "Madrid"], "answer": 1},
    {"question": "Question: What is two plus two?\nAnswer:", "choices": ["three", "five", "four"], "answer": 2},
    {"question": "Question: Which one is a tree?\nAnswer:", "choices": ["oak", "cat"], "answer": 0},
    {"question": "Question: Which one is an animal?\nAnswer:", "choices": ["pine", "dog", "stone"], "answer": 1},
    {"question": "Review : a gripping story\nSentiment :", "choices": ["negative", "positive"], "answer": 1},
    {"question": "Review : a dull and tired mess\nSentiment :", "choices": ["negative", "positive"], "answer": 0},
    {"question": "Question: What is the capital of Italy?\nAnswer:", "choices": ["Paris", "Rome"], "answer": 1},
    {"question": "Question: What is three plus three?\nAnswer:", "choices": ["six", "nine", "two"], "answer": 0},
    {"question": "Question: Which colour is grass?\nAnswer:", "choices": ["red", "blue", "green"], "answer": 2},
    {"question": "Question: (A) yes\n(B) no\nAnswer:", "choices": ["A", "B"], "answer": 1},
    {"question": "Question: {braces} and 'quotes' survive?\nAnswer:", "choices": ["yes", "no", "maybe", "never"], "answer": 3},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CORPUS * 4, vocab_size=400, add_bos=True)


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    return make_llama(tokenizer, layers=2, seed=seed, frozen=False, max_position_embeddings=2048)


@pytest.fixture()
def mc_task(tmp_path):
    data = tmp_path / "data" / "tiny_mc.jsonl"
    write_jsonl(data, MC_ITEMS)
    yaml_path = write_mc_task("tiny_mc", data, tmp_path / "tasks")
    return yaml_path.parent


@torch.no_grad()
def direct_loglikelihoods(model, tokenizer, question: str, choices: list[str], keep_bos: bool = True) -> list[float]:
    """Sum of log p(continuation tokens | question) for " " + choice, computed without lm-eval.

    The question is tokenized alone and with the continuation appended; the continuation is the
    tail of the joint encoding. The tokenizer prepends BOS, which conditions but is never scored.
    With keep_bos=False the BOS is dropped (what a BOS-unaware harness would compute).
    """
    context_ids = tokenizer(question)["input_ids"]
    assert context_ids[0] == tokenizer.bos_token_id
    scores = []
    for choice in choices:
        full_ids = tokenizer(question + " " + choice)["input_ids"]
        assert full_ids[: len(context_ids)] == context_ids
        n_context = len(context_ids)
        if not keep_bos:
            full_ids, n_context = full_ids[1:], n_context - 1
        logprobs = torch.log_softmax(model(torch.tensor([full_ids])).logits[0].float(), dim=-1)  # (T, V)
        scores.append(sum(logprobs[n_context - 1 + j, token].item() for j, token in enumerate(full_ids[n_context:])))
    return scores


def test_acc_matches_direct_loglikelihood_argmax(tokenizer, mc_task):
    model = tiny_llama(tokenizer)
    results = lm_eval_results(model, tokenizer, ["tiny_mc"], include_path=mc_task, batch_size=4, log_samples=True)
    items = sorted(item_rows(results), key=lambda row: row["doc_id"])
    rows = {row["metric"]: row for row in metric_rows(results)}
    assert len(items) == len(MC_ITEMS)

    direct = [direct_loglikelihoods(model, tokenizer, item["question"], item["choices"]) for item in MC_ITEMS]
    for row, scores in zip(items, direct, strict=True):
        np.testing.assert_allclose(row["loglikelihoods"], scores, rtol=0, atol=1e-4)
    predictions = [int(np.argmax(scores)) for scores in direct]
    norm_predictions = [  # acc_norm divides by the choice's length in characters
        int(np.argmax(np.array(scores) / [len(c) for c in item["choices"]]))
        for scores, item in zip(direct, MC_ITEMS, strict=True)
    ]
    answers = [item["answer"] for item in MC_ITEMS]
    assert [row["prediction"] for row in items] == predictions
    assert rows["acc"]["value"] == pytest.approx(np.mean(np.equal(predictions, answers)), abs=1e-12)
    assert rows["acc_norm"]["value"] == pytest.approx(np.mean(np.equal(norm_predictions, answers)), abs=1e-12)
    assert rows["acc"]["n_items"] == len(MC_ITEMS) and rows["acc"]["stderr"] > 0

    # BOS is part of the scored context: dropping it gives different log-likelihoods.
    no_bos = [direct_loglikelihoods(model, tokenizer, it["question"], it["choices"], keep_bos=False) for it in MC_ITEMS]
    gaps = [abs(a - b) for row, scores in zip(items, no_bos, strict=True) for a, b in zip(row["loglikelihoods"], scores)]
    assert max(gaps) > 1e-2


def _scores(results: dict) -> dict:
    """(task, doc_id) -> [(log-likelihood, is_greedy) per choice] from lm-eval's logged samples."""
    return {(task, sample["doc_id"]): [(float(r[0]), bool(r[1])) for r in sample["filtered_resps"]]
            for task, samples in results["samples"].items() for sample in samples}


# one context per pass (token budget 1); all 12 in one padded pass; passes of lm-eval's batch size
@pytest.mark.parametrize(("batch_size", "batch_tokens", "passes"), [(16, 1, 12), (16, 1024, 1), (5, 1024, 3)])
def test_shared_contexts_score_as_lm_eval_does(tokenizer, mc_task, monkeypatch, batch_size, batch_tokens, passes):
    """Each distinct context runs once (its continuations over its KV cache) and every choice gets
    HFLM's own log-likelihood and greedy flag: 2-shot contexts of different lengths, choices of
    one and several tokens, and requests longer than the window (HFLM's own loop)."""
    import editlib.eval.downstream as downstream

    monkeypatch.setattr(downstream, "CONTEXT_BATCH_TOKENS", batch_tokens)
    model = tiny_llama(tokenizer)
    context_rows = []  # rows of every pass that starts from an empty cache

    def count(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is None or cache.get_seq_length() == 0:
            context_rows.append(kwargs["input_ids"].shape[0])

    hook = model.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        shared = lm_eval_results(model, tokenizer, ["tiny_mc"], include_path=mc_task, num_fewshot=2, log_samples=True,
                                 batch_size=batch_size)
    finally:
        hook.remove()
    plain = lm_eval_results(model, tokenizer, ["tiny_mc"], include_path=mc_task, num_fewshot=2, log_samples=True,
                            share_contexts=False)
    shared_scores, plain_scores = _scores(shared), _scores(plain)
    assert shared_scores.keys() == plain_scores.keys() and len(shared_scores) == len(MC_ITEMS)
    for key, expected in plain_scores.items():
        np.testing.assert_allclose([s for s, _ in shared_scores[key]], [s for s, _ in expected], rtol=0, atol=1e-4)
        assert [g for _, g in shared_scores[key]] == [g for _, g in expected]
    lengths = {len(tokenizer(choice)["input_ids"]) - 1 for item in MC_ITEMS for choice in item["choices"]}
    assert lengths & {1} and max(lengths) > 1  # BOS + tokens: one-token and longer choices both occur
    contexts = {sample["arguments"][0][0] for sample in shared["samples"]["tiny_mc"]}
    assert sum(context_rows) == len(contexts) == len(MC_ITEMS)  # one context pass per item, not per choice
    assert len(context_rows) == passes

    # a window shorter than the longest requests: those go through HFLM's truncating loop
    sizes = sorted(len(tokenizer(context + choice)["input_ids"])
                   for sample in shared["samples"]["tiny_mc"] for context, choice in sample["arguments"])
    window = sizes[len(sizes) // 2] - 1  # about half the requests longer than window + 1
    short = lm_eval_results(model, tokenizer, ["tiny_mc"], include_path=mc_task, num_fewshot=2, log_samples=True,
                            max_length=window)
    short_plain = lm_eval_results(model, tokenizer, ["tiny_mc"], include_path=mc_task, num_fewshot=2, log_samples=True,
                                  max_length=window, share_contexts=False)
    for key, expected in _scores(short_plain).items():
        np.testing.assert_allclose([s for s, _ in _scores(short)[key]], [s for s, _ in expected], rtol=0, atol=1e-4)
    overlong = [size for size in sizes if size > window + 1]
    assert 0 < len(overlong) < len(sizes)
    assert _scores(short) != shared_scores  # truncation changed the scores of those requests


def test_tidy_rows_limit_and_state_restored(tokenizer, mc_task):
    model = tiny_llama(tokenizer).train()
    torch.manual_seed(99)
    expected_next = torch.rand(3)
    torch.manual_seed(99)
    rows = evaluate_downstream(model, tokenizer, ["tiny_mc"], include_path=mc_task, limit=5, batch_size=2)
    assert sorted(row["metric"] for row in rows) == ["acc", "acc_norm"]
    assert all(set(row) == {"task", "metric", "higher_is_better", "value", "stderr", "n_items", "error"}
               and row["error"] is None and row["higher_is_better"] is True
               for row in rows)
    assert all(row["task"] == "tiny_mc" and row["n_items"] == 5 and 0 <= row["value"] <= 1 for row in rows)
    assert model.training  # HFLM calls model.eval(); the caller's mode comes back
    assert torch.equal(torch.rand(3), expected_next)  # lm-eval's global seeding does not leak
    assert (mc_task / ".hf_datasets_cache").is_dir()  # datasets' Arrow copy stays beside the task


def test_destructive_edit_changes_predictions_and_restore_is_exact(tokenizer, mc_task):
    model = tiny_llama(tokenizer)
    weight = model.model.layers[0].mlp.down_proj.weight

    def run():
        results = lm_eval_results(model, tokenizer, ["tiny_mc"], include_path=mc_task, batch_size=4, log_samples=True)
        return sorted(item_rows(results), key=lambda row: row["doc_id"]), {r["metric"]: r["value"] for r in metric_rows(results)}

    before_items, before_metrics = run()
    original = weight.detach().clone()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        weight.add_(100.0 * weight.norm() * torch.randn(weight.shape, generator=generator))
    broken_items, _ = run()
    with torch.no_grad():
        weight.copy_(original)
    restored_items, restored_metrics = run()

    assert [r["prediction"] for r in broken_items] != [r["prediction"] for r in before_items]
    assert restored_items == before_items  # bitwise-equal log-likelihoods
    assert restored_metrics == before_metrics


def test_write_mc_task_absolute_paths_and_validation(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("rel.jsonl"), MC_ITEMS[:4])
    yaml_path = write_mc_task("rel_mc", "rel.jsonl", "tasks", fewshot_jsonl_path="rel.jsonl", cache_dir="cache")
    import yaml

    config = yaml.safe_load(yaml_path.read_text())
    assert Path(config["dataset_kwargs"]["data_files"]["test"]).is_absolute()
    assert Path(config["dataset_kwargs"]["cache_dir"]) == tmp_path / "cache"
    assert "num_fewshot" not in config

    # evaluated from another working directory, the relative file is still found
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rows = evaluate_downstream(tiny_llama(tokenizer), tokenizer, ["rel_mc"], include_path=tmp_path / "tasks", num_fewshot=1)
    assert {row["n_items"] for row in rows} == {4}

    write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 2}])
    with pytest.raises(ValueError, match="answer"):
        write_mc_task("bad_mc", tmp_path / "bad.jsonl", tmp_path / "tasks")
    with pytest.raises(ValueError, match="tasks not found"):
        evaluate_downstream(tiny_llama(tokenizer), tokenizer, ["no_such_task"], include_path=tmp_path / "tasks")


def test_hub_offline_is_scoped():
    import datasets.config
    import huggingface_hub.constants

    before = (os.environ.get("HF_HUB_OFFLINE"), huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    with hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        assert huggingface_hub.constants.is_offline_mode() and datasets.config.HF_HUB_OFFLINE
    assert (os.environ.get("HF_HUB_OFFLINE"), huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data folder ../shared/data is absent")
def test_glue_eval_mmlu_sst2_through_local_tasks(tokenizer, tmp_path):
    glue = SHARED_DATA / "glue_eval"
    mmlu = glue_eval_items("mmlu", glue / "mmlu.jsonl")
    first = json.loads((glue / "mmlu.jsonl").open().readline())
    assert len(mmlu) == 1516
    assert mmlu[0]["question"] == (
        f"Question: {first['question']}\n(A) {first['choices'][0]}\n(B) {first['choices'][1]}\n"
        f"(C) {first['choices'][2]}\n(D) {first['choices'][3]}\nAnswer:"
    )
    assert mmlu[0]["choices"] == ["A", "B", "C", "D"] and mmlu[0]["answer"] == first["answer"]
    sst2 = glue_eval_items("sst2", glue)
    assert sst2[0]["question"].startswith("Review : ") and sst2[0]["question"].endswith("\nSentiment :")
    assert sum(item["answer"] for item in sst2) == 428  # 428 positive (label 1 -> "positive")

    for task in ("mmlu", "sst2"):
        write_glue_eval_task(task, glue / f"{task}.jsonl", tmp_path / "tasks")
    assert sum(1 for _ in (tmp_path / "tasks" / "glue_eval_mmlu.jsonl").open()) == 1516 - 10

    model = tiny_llama(tokenizer)
    results = lm_eval_results(
        model, tokenizer, ["glue_eval_mmlu", "glue_eval_sst2"], include_path=tmp_path / "tasks", limit=3, log_samples=True
    )
    rows = metric_rows(results)
    assert {(row["task"], row["metric"]) for row in rows} == {
        (task, metric) for task in ("glue_eval_mmlu", "glue_eval_sst2") for metric in ("acc", "acc_norm")
    }
    assert all(row["n_items"] == 3 for row in rows)
    # the evaluated items are the ones after the 10-item few-shot pool, scored as " A".." D"
    for sample, item in zip(results["samples"]["glue_eval_mmlu"], mmlu[10:13], strict=True):
        assert sample["arguments"][0] == (item["question"], " A")
        scores = direct_loglikelihoods(model, tokenizer, item["question"], item["choices"])
        np.testing.assert_allclose([resp[0] for resp in sample["filtered_resps"]], scores, atol=1e-4)

    # few-shot: UME takes the pool's first items in order, separated by "\n"
    results = lm_eval_results(
        model, tokenizer, ["glue_eval_sst2"], include_path=tmp_path / "tasks", limit=1, num_fewshot=2, log_samples=True
    )
    context = results["samples"]["glue_eval_sst2"][0]["arguments"][0][0]
    shots = [f"{item['question']} {item['choices'][item['answer']]}\n" for item in sst2[:2]]
    assert context == "".join(shots) + sst2[10]["question"]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data folder ../shared/data is absent")
def test_glue_eval_converters_cover_all_files():
    sizes = {"mmlu": 1516, "sst2": 856, "mrpc": 258, "cola": 644, "rte": 262, "nli": 2489, "sentiment_analysis": 872, "dialogue": 886}
    for task, size in sizes.items():
        items = glue_eval_items(task, SHARED_DATA / "glue_eval")
        assert len(items) == size, task
        assert all(0 <= item["answer"] < len(item["choices"]) for item in items), task
        assert all(item["question"].rstrip() == item["question"] for item in items), task  # delimiter adds the space
    rte = glue_eval_items("rte", SHARED_DATA / "glue_eval")
    assert rte[1]["question"].endswith("P. Prayong is a member of Theravada. True or False?\nanswer:")
    assert rte[1]["choices"][rte[1]["answer"]] == "True"  # GLUE label 0 = entailment


def test_grace_edit_takes_but_leaves_downstream_items_unchanged(tokenizer, mc_task):
    """GRACE changes no base weight: task items whose queries lie outside the codebook's radii
    get bit-identical log-likelihoods, while the edited prompt's continuation does change."""
    from editlib.data.records import EditRequest
    from editlib.methods.grace import GraceHparams
    from editlib.methods.grace.session import GraceEditor

    model = tiny_llama(tokenizer)

    def items():
        results = lm_eval_results(model, tokenizer, ["tiny_mc"], include_path=mc_task, batch_size=1, log_samples=True,
                                  share_contexts=False)  # as the pipeline runs GRACE (editlib.methods.registry)
        return sorted(item_rows(results), key=lambda row: row["doc_id"])

    before = items()
    request = EditRequest(case_id=0, prompt="{} are animals; oak and pine are", subject="Cats and dogs",
                          target_new="blue", target_true="trees")
    prompt_ids = torch.tensor([tokenizer(request.text)["input_ids"]])
    with torch.no_grad():
        before_edit = model(prompt_ids).logits[0, -1]
    editor = GraceEditor(model, tokenizer, "model.layers.1.mlp.down_proj", GraceHparams(eps=1e-3, n_iter=30))
    try:
        editor.edit([request])
        with torch.no_grad():
            after_edit = model(prompt_ids).logits[0, -1]
        assert not torch.equal(before_edit, after_edit)  # the edited prompt is answered by the codebook
        assert items() == before
    finally:
        editor.remove()


def test_grace_batches_of_one_length_score_as_batch_size_one(tokenizer, tmp_path):
    """A codebook that answers one task item reads that item's last token; a padded batch moves
    that position onto padding. Batches of one length give batch size 1's scores, the padded
    batches of HFLM's loop do not (which is what makes the check able to fail)."""
    from editlib.data.records import EditRequest
    from editlib.methods.grace import GraceHparams
    from editlib.methods.grace.session import GraceEditor

    request = EditRequest(case_id=0, prompt="{} are animals; oak and pine are", subject="Cats and dogs",
                          target_new="blue", target_true="trees")
    edited_item = {"question": request.text, "choices": ["blue", "trees", "green"], "answer": 1}
    data = tmp_path / "data" / "tiny_mc.jsonl"
    write_jsonl(data, [*MC_ITEMS, edited_item])
    tasks = write_mc_task("tiny_mc", data, tmp_path / "tasks").parent
    model = tiny_llama(tokenizer)
    editor = GraceEditor(model, tokenizer, "model.layers.1.mlp.down_proj", GraceHparams(eps=1e-3, n_iter=30))
    try:
        editor.edit([request])

        def scores(batch_size: int, equal_length_batches: bool) -> dict[int, list[float]]:
            results = lm_eval_results(model, tokenizer, ["tiny_mc"], include_path=tasks, batch_size=batch_size,
                                      log_samples=True, share_contexts=False,
                                      equal_length_batches=equal_length_batches)
            return {row["doc_id"]: row["loglikelihoods"] for row in item_rows(results)}

        alone, equal_lengths, padded = scores(1, False), scores(64, True), scores(64, False)  # 64: one batch
    finally:
        editor.remove()
    unedited = {row["doc_id"]: row["loglikelihoods"] for row in item_rows(lm_eval_results(
        model, tokenizer, ["tiny_mc"], include_path=tasks, batch_size=1, log_samples=True, share_contexts=False))}
    edited_id = len(MC_ITEMS)
    lengths = [len(tokenizer(item["question"] + " " + choice)["input_ids"]) for item in MC_ITEMS for choice in item["choices"]]
    assert max(lengths) > len(tokenizer(request.text)["input_ids"]) + 1  # longer rows pad the edited item's
    assert not np.allclose(alone[edited_id], unedited[edited_id], atol=1e-3)  # the codebook answers the item
    assert alone.keys() == equal_lengths.keys() == padded.keys()
    for doc_id, expected in alone.items():
        np.testing.assert_allclose(equal_lengths[doc_id], expected, rtol=0, atol=1e-4)
    assert not np.allclose(padded[edited_id], alone[edited_id], atol=1e-3)  # padding hid the query from it
    with pytest.raises(ValueError, match="share_contexts=False"):
        lm_eval_results(model, tokenizer, ["tiny_mc"], include_path=tasks, equal_length_batches=True)


# ---------------------------------------------------------------------------- one lm-eval call per task

ENV_PROBE = '''import os


def process_results(doc, results):
    """Whether the code-eval permission was on while the task was scored (1.0) or not (0.0)."""
    return {"code_eval_allowed": float(os.environ.get("HF_ALLOW_CODE_EVAL") == "1")}
'''


def _write_task_family(tasks_dir: Path) -> None:
    """sub_a (5 items), sub_b (7), sub_c (6), all tagged my_tag; a group that lists an aggregate
    (acc, by size), one that lists none, a group nesting the first one; a task marked unsafe_code."""
    import yaml

    for name, items in (("sub_a", MC_ITEMS[:5]), ("sub_b", MC_ITEMS[5:12]), ("sub_c", MC_ITEMS[2:8])):
        write_jsonl(tasks_dir / f"{name}.jsonl", items)
        path = write_mc_task(name, tasks_dir / f"{name}.jsonl", tasks_dir)
        config = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump({**config, "tag": "my_tag"}))
    groups = {
        "grp_agg": {"task": ["sub_a", "sub_b"], "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]},
        "grp_plain": {"task": ["sub_a", "sub_c"]},
        "grp_nest": {"task": ["grp_agg", "sub_c"], "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]},
    }
    for name, body in groups.items():
        (tasks_dir / f"{name}.yaml").write_text(yaml.safe_dump({"group": name, **body, "metadata": {"version": 1}}))
    # a multiple-choice task flagged unsafe_code whose metric reports the HF_ALLOW_CODE_EVAL it saw
    path = write_mc_task("unsafe_probe", tasks_dir / "sub_a.jsonl", tasks_dir)
    config = yaml.safe_load(path.read_text())
    (tasks_dir / "probe_utils.py").write_text(ENV_PROBE)
    text = yaml.safe_dump({**config, "unsafe_code": True, "metric_list": [
        {"metric": "code_eval_allowed", "aggregation": "mean", "higher_is_better": True}]})
    path.write_text(text + "process_results: !function probe_utils.process_results\n")


@pytest.fixture()
def task_family(tmp_path):
    tasks_dir = tmp_path / "family"
    _write_task_family(tasks_dir)
    return tasks_dir


@pytest.fixture()
def one_thread():
    """torch on one thread: this tiny model's products gain nothing from more, and on a shared
    machine they wait for the busiest core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_unsafe_code_task_needs_the_opt_in_and_fails_alone(tokenizer, task_family, monkeypatch):
    """A task lm-eval marks unsafe_code fails with a message naming it and the config key, while
    the other tasks of the same call are still scored; opted in, it runs with HF_ALLOW_CODE_EVAL=1
    set for the call only."""
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    model = tiny_llama(tokenizer)
    rows = evaluate_downstream(model, tokenizer, ["unsafe_probe", "sub_a"], include_path=task_family)
    [failed] = [row for row in rows if row["task"] == "unsafe_probe"]
    assert failed["value"] is None and failed["metric"] is None
    assert "unsafe_probe" in failed["error"] and "downstream.confirm_run_unsafe_code" in failed["error"]
    scored = {row["metric"]: row for row in rows if row["task"] == "sub_a"}
    assert set(scored) == {"acc", "acc_norm"}
    assert all(row["error"] is None and row["n_items"] == 5 for row in scored.values())

    rows = evaluate_downstream(model, tokenizer, ["unsafe_probe"], include_path=task_family,
                               confirm_run_unsafe_code=True)
    assert [(row["metric"], row["value"], row["error"]) for row in rows] == [("code_eval_allowed", 1.0, None)]
    assert "HF_ALLOW_CODE_EVAL" not in os.environ  # restored after the call
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "0")
    evaluate_downstream(model, tokenizer, ["unsafe_probe"], include_path=task_family, confirm_run_unsafe_code=True)
    assert os.environ["HF_ALLOW_CODE_EVAL"] == "0"


def test_a_failing_task_leaves_the_others_scored(tokenizer, task_family, monkeypatch):
    """One task raising inside lm-eval gives that task an error row; the tasks before and after it
    get the same rows as when evaluated without it."""
    import editlib.eval.downstream as downstream

    model = tiny_llama(tokenizer)
    alone = evaluate_downstream(model, tokenizer, ["sub_a", "sub_c"], include_path=task_family)
    original = downstream.lm_eval_results

    def failing(model, tokenizer, tasks, **kwargs):
        if tasks == ["sub_b"]:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(model, tokenizer, tasks, **kwargs)

    monkeypatch.setattr(downstream, "lm_eval_results", failing)
    rows = evaluate_downstream(model, tokenizer, ["sub_a", "sub_b", "sub_c"], include_path=task_family)
    assert [row for row in rows if row["task"] != "sub_b"] == alone
    assert [row for row in rows if row["task"] == "sub_b"] == [
        {"task": "sub_b", "metric": None, "value": None, "stderr": None, "n_items": None,
         "error": "RuntimeError: CUDA out of memory (simulated)"}]
    with pytest.raises(ValueError, match="tasks not found"):  # a misspelt name fails before anything runs
        evaluate_downstream(model, tokenizer, ["sub_a", "sub_x"], include_path=task_family)


def test_groups_and_tags_are_one_row_per_metric_with_subtasks_apart(tokenizer, task_family, one_thread):
    """A group with an aggregate is lm-eval's aggregate; a group without one and a tag are the
    size-weighted mean of their leaf tasks with lm-eval's pooled standard error; the leaf tasks
    are separate rows naming their group; nested groups contribute leaf tasks only."""
    from lm_eval.api.metrics import pooled_sample_stderr

    model = tiny_llama(tokenizer)
    configured = ["grp_agg", "grp_plain", "my_tag", "grp_nest", "sub_a"]
    rows = evaluate_downstream(model, tokenizer, configured, include_path=task_family)
    main = [row for row in rows if "group" not in row]
    leaves = [row for row in rows if "group" in row]
    assert [(row["task"], row["metric"]) for row in main] == [
        ("grp_agg", "acc"), ("grp_plain", "acc"), ("grp_plain", "acc_norm"), ("my_tag", "acc"), ("my_tag", "acc_norm"),
        ("grp_nest", "acc"), ("sub_a", "acc"), ("sub_a", "acc_norm")]
    members = {"grp_agg": ["sub_a", "sub_b"], "grp_plain": ["sub_a", "sub_c"], "my_tag": ["sub_a", "sub_b", "sub_c"],
               "grp_nest": ["sub_a", "sub_b", "sub_c"]}
    sizes = {"sub_a": 5, "sub_b": 7, "sub_c": 6}
    for group, tasks in members.items():
        part = [row for row in leaves if row["group"] == group]
        assert sorted({row["task"] for row in part}) == tasks  # leaf tasks only, each naming its group
        for row in (row for row in main if row["task"] == group):
            subtask = {r["task"]: r for r in part if r["metric"] == row["metric"]}
            n = [sizes[task] for task in tasks]
            assert row["n_items"] == sum(n) and [subtask[task]["n_items"] for task in tasks] == n
            expected = sum(subtask[task]["value"] * size for task, size in zip(tasks, n)) / sum(n)
            assert row["value"] == pytest.approx(expected, abs=1e-12)
            se = pooled_sample_stderr([subtask[task]["stderr"] for task in tasks], n)
            assert row["stderr"] == pytest.approx(se, rel=1e-9)
    # the leaf rows are the same scores as each task evaluated on its own
    own = {(row["task"], row["metric"]): row["value"]
           for row in evaluate_downstream(model, tokenizer, ["sub_a", "sub_b", "sub_c"], include_path=task_family)}
    assert all(row["value"] == own[(row["task"], row["metric"])] for row in leaves)
    # a plain task is its own row, as it is when a tag evaluates it
    in_tag = [{**{k: v for k, v in row.items() if k != "group"}, "error": None}
              for row in leaves if row["group"] == "my_tag" and row["task"] == "sub_a"]
    assert [row for row in main if row["task"] == "sub_a"] == in_tag


def test_num_fewshot_none_keeps_each_tasks_own_setting(tokenizer, tmp_path, monkeypatch, one_thread):
    """A task whose YAML sets num_fewshot: 2 gets 2 shots unless a number is given, and the
    workflow passes none when the config sets none."""
    import yaml

    import editlib.eval.downstream as downstream
    from editlib.study.pipeline import downstream_function

    data = tmp_path / "data" / "mc.jsonl"
    write_jsonl(data, MC_ITEMS)
    path = write_mc_task("two_shot", data, tmp_path / "tasks", fewshot_sampler="first_n")
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "num_fewshot": 2}))
    model = tiny_llama(tokenizer)

    def contexts(**kwargs):
        results = lm_eval_results(model, tokenizer, ["two_shot"], include_path=tmp_path / "tasks", limit=2,
                                  log_samples=True, **kwargs)
        return results["n-shot"]["two_shot"], [s["arguments"][0][0] for s in results["samples"]["two_shot"]]

    default, explicit, zero = contexts(), contexts(num_fewshot=2), contexts(num_fewshot=0)
    assert default == explicit and default[0] == 2
    assert zero[0] == 0 and zero[1] != default[1]
    assert all(context.count("\n\n") == 2 for context in default[1])  # two examples, each ending in the delimiter

    seen = []
    original = downstream.evaluate_downstream

    def spy(*args, **kwargs):
        seen.append(kwargs["num_fewshot"])
        return original(*args, **kwargs)

    import editlib.study.pipeline as pipeline

    monkeypatch.setattr(pipeline, "evaluate_downstream", spy)
    for settings, expected in (({}, None), ({"num_fewshot": None}, None), ({"num_fewshot": 1}, 1)):
        config = {"seed": 0, "downstream": {"tasks": ["two_shot"], "limit": 2, **settings}}
        downstream_function(config, tmp_path / "tasks", None)(model, tokenizer)
        assert seen[-1] == expected


def test_paper_configs_opt_in_to_code_tasks_and_keep_task_few_shot():
    import yaml

    from editlib.study.config import validate_config

    repo = Path(__file__).resolve().parents[1]
    schema = repo / "workflow" / "schemas" / "config.schema.yaml"
    for name in ("llama3-8b", "llama2-7b", "llama2-7b-chat", "llama2-13b"):
        config = yaml.safe_load((repo / "configs" / f"{name}.yaml").read_text(encoding="utf-8"))
        settings = config["downstream"]
        assert "num_fewshot" not in settings, name
        assert settings.get("confirm_run_unsafe_code") is ("mbpp" in settings["tasks"]), name
        validate_config(config, schema, source=name)
    config = yaml.safe_load((repo / "configs" / "llama2-7b.yaml").read_text(encoding="utf-8"))
    config["downstream"]["num_fewshot"] = None  # null: each task's own setting
    validate_config(config, schema)


# ---------------------------------------------------------------------------- the workflow's downstream jobs


class Killed(BaseException):
    """Stands in for the job being killed (not an Exception: nothing on the way catches it)."""


def _job_setup(tokenizer, tmp_path):
    """A saved tiny model, three ROME edit states of it (n1..n3) and the job's config."""
    from editlib.data.records import EditRequest
    from editlib.study.experiments import ExperimentContext, save_state
    from editlib.study.pipeline import edit_spec

    model_dir, states = tmp_path / "model", tmp_path / "states"
    model = tiny_llama(tokenizer)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = {"seed": 0, "model": {"name": "tiny", "dtype": "float32"},
              "downstream": {"tasks": ["grp_agg"], "limit": 2, "batch_size": 4},
              "methods": {"rome": {"mom2_adjustment": False, "targets": {"v_num_grad_steps": 3}}},
              "experiments": {"sequential": {"downstream_at": [0, 1, 2, 3]}}}
    spec = edit_spec(config, "rome", (1,))
    session = ExperimentContext(model, tokenizer, "tiny", {}, progress=False).session(spec)
    facts = [("{} are animals; oak and pine are", "Cats and dogs", "blue", "trees"),
             ("The capital of {} is", "France", "Rome", "Paris"),
             ("{} plus two is four", "Two", "six", "four")]
    for n, (prompt, subject, new, true) in enumerate(facts, 1):
        session.apply([EditRequest(case_id=n, prompt=prompt, subject=subject, target_new=new, target_true=true)])
        save_state(states / f"n{n}.safetensors", session, spec, "sequential", 1, n)
    session.close()
    return config, model_dir, states


def test_downstream_job_resumes_per_state(tokenizer, task_family, tmp_path, monkeypatch, one_thread):
    """A downstream job killed after its first edit state evaluates only the other two when run
    again, and writes the tables an uninterrupted run writes; its partial rows are keyed on the
    state file and the settings, and removed with the tables written."""
    import editlib.study.pipeline as pipeline
    from editlib.io import sha256_file
    from editlib.study.pipeline import DownstreamPartials, items_path, run_downstream, run_downstream_base

    config, model_dir, states = _job_setup(tokenizer, tmp_path)
    base = tmp_path / "base.csv"
    run_downstream_base(config, model_dir, task_family, base)
    reference = sha256_file(items_path(base))

    def job(out, partials, settings=config):
        return run_downstream(settings, "sequential", "rome", 1, model_dir, None, None, task_family, states, base,
                              tmp_path / out, partials_dir=tmp_path / partials)

    job("straight.csv", "partials_straight")
    assert not (tmp_path / "partials_straight").exists()

    def killed_job(out, partials):
        original = DownstreamPartials.put

        def put_then_die(self, path, rows):
            original(self, path, rows)
            raise Killed

        with monkeypatch.context() as patch:
            patch.setattr(DownstreamPartials, "put", put_then_die)
            with pytest.raises(Killed):
                job(out, partials)
        assert not (tmp_path / out).exists() and len(list((tmp_path / partials).glob("*.json"))) == 1

    calls = []
    original = pipeline.evaluate_downstream
    monkeypatch.setattr(pipeline, "evaluate_downstream", lambda *a, **k: calls.append(1) or original(*a, **k))

    killed_job("resumed.csv", "partials")
    calls.clear()
    job("resumed.csv", "partials")
    assert len(calls) == 2  # n2 and n3; n1's rows came from the partial file
    for name in ("resumed.csv", "resumed_subtasks.csv"):
        straight = pd.read_csv(tmp_path / name.replace("resumed", "straight"))
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / name), straight, check_exact=True)
    table = pd.read_csv(tmp_path / "resumed.csv")
    assert sorted(table["n_edits"].unique()) == [0, 1, 2, 3]
    assert list(table["task"].unique()) == ["grp_agg"]  # the group's leaf tasks are in the subtask table
    subtasks = pd.read_csv(tmp_path / "resumed_subtasks.csv")
    assert set(subtasks["group"]) == {"grp_agg"} and set(subtasks["task"]) == {"sub_a", "sub_b"}
    # lm-eval's metric direction on every row, the unedited model's and each edit state's
    assert table["higher_is_better"].eq(True).all() and subtasks["higher_is_better"].eq(True).all()
    assert not (tmp_path / "partials").exists()
    # every edited row is paired with the unedited model item by item: the leaves from the base's
    # per-item values (both items of each leaf, acc and acc_norm), the size-weighted group from its leaves
    items = pd.read_csv(items_path(base))
    assert set(zip(items["task"], items["metric"])) == {(t, m) for t in ("sub_a", "sub_b") for m in ("acc", "acc_norm")}
    assert items.groupby(["task", "metric"]).size().eq(2).all() and items["value"].isin([0.0, 1.0]).all()
    assert table.loc[table["n_edits"] == 0, "change_stderr"].eq(0).all()
    assert subtasks["change_stderr"].notna().all() and table["change_stderr"].notna().all()
    for n_edits, leaves in subtasks[subtasks["metric"] == "acc"].groupby("n_edits"):
        weights = leaves["n_items"] / leaves["n_items"].sum()
        [group] = table.loc[(table["n_edits"] == n_edits) & (table["metric"] == "acc"), "change_stderr"]
        assert group == pytest.approx(float(np.sqrt((weights ** 2 * leaves["change_stderr"] ** 2).sum())))
    # the findings' mean over tasks reads the group once, not its subtasks
    from editlib.study.findings import downstream_erosion

    [finding] = downstream_erosion(table)
    assert "(grp_agg " in finding["evidence"] and "sub_a" not in finding["evidence"]

    # the partial of another state file (an editing job that reran) or other settings is not reused
    killed_job("again.csv", "partials")
    state = states / "n1.safetensors"
    assert DownstreamPartials(tmp_path / "partials", config, reference).get(state) is not None
    other = {**config, "downstream": {**config["downstream"], "limit": 1}}
    assert DownstreamPartials(tmp_path / "partials", other, reference).get(state) is None
    # nor one paired with other values of the unedited model
    assert DownstreamPartials(tmp_path / "partials", config, "another").get(state) is None
    os.utime(state, ns=(0, 0))
    assert DownstreamPartials(tmp_path / "partials", config, reference).get(state) is None
    # a state on which every task failed is evaluated again (the job failed; its cause may be fixed)
    partials = DownstreamPartials(tmp_path / "partials", config)
    failed = [{"task": "grp_agg", "metric": None, "value": None, "stderr": None, "n_items": None, "error": "OSError: hub"}]
    partials.put(state, failed)
    assert partials.get(state) is None
    partials.put(state, [*failed, {"task": "sub_a", "metric": "acc", "value": 0.5, "stderr": 0.1, "n_items": 2,
                                   "error": None}])
    assert partials.get(state) is not None


def test_downstream_job_keeps_the_tasks_that_ran(tokenizer, task_family, tmp_path):
    """A job with a failed task writes the others' rows and the failure's error and returns; a job
    in which every task failed raises before writing anything."""
    from editlib.study.pipeline import run_downstream_base

    model_dir = tmp_path / "model"
    tiny_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = {"seed": 0, "model": {"name": "tiny", "dtype": "float32"},
              "downstream": {"tasks": ["unsafe_probe", "grp_plain"], "limit": 3}}
    run_downstream_base(config, model_dir, task_family, tmp_path / "base.csv")
    table = pd.read_csv(tmp_path / "base.csv")
    assert list(table.columns) == ["task", "metric", "higher_is_better", "value", "stderr", "change_stderr", "n_items",
                                   "error"]
    assert table["higher_is_better"].dropna().astype(bool).all()  # accuracies, as lm-eval reports them
    failed = table[table["task"] == "unsafe_probe"]
    assert len(failed) == 1 and failed["value"].isna().all()
    assert "downstream.confirm_run_unsafe_code" in failed["error"].iloc[0]
    assert table[table["task"] == "grp_plain"]["value"].notna().all() and len(table) == 3
    subtasks = pd.read_csv(tmp_path / "base_subtasks.csv")
    assert set(subtasks["group"]) == {"grp_plain"} and set(subtasks["task"]) == {"sub_a", "sub_c"}

    config["downstream"]["tasks"] = ["unsafe_probe"]
    with pytest.raises(RuntimeError, match="every downstream task failed.*unsafe_probe"):
        run_downstream_base(config, model_dir, task_family, tmp_path / "only.csv")
    assert not (tmp_path / "only.csv").exists()


TEXTS = [*CORPUS, "Oak, pine and birch grow in the north.", "The sky is blue and the grass is green today."]


@torch.no_grad()
def direct_text_loglikelihood(model, tokenizer, text: str) -> float:
    """log p(text) token by token after lm-eval's prefix token (BOS), the way loglikelihood_rolling
    scores a text shorter than the window: the text's tokens as the tokenizer encodes it, a BOS the
    tokenizer prepends included (lm-eval 0.4.13 scores it too)."""
    ids = [tokenizer.bos_token_id, *tokenizer(text)["input_ids"]]
    logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(logprobs[i, token].item() for i, token in enumerate(ids[1:]))


@pytest.mark.parametrize("share_contexts, equal_length_batches", [(True, False), (False, False), (False, True)])
def test_perplexity_task_scores_whole_texts_with_a_standard_error(tokenizer, tmp_path, share_contexts,
                                                                  equal_length_batches):
    """A local perplexity task: lm-eval's word perplexity over the texts (lower is better, so a mean
    accuracy can leave it out), and the delta-method standard error of that ratio, both equal to
    what the model's own log-probabilities give, through each of the three scoring loops."""
    data = tmp_path / "data" / "texts.jsonl"
    write_jsonl(data, [{"text": text} for text in TEXTS])
    tasks = write_perplexity_task("tiny_texts", data, tmp_path / "tasks").parent
    model = tiny_llama(tokenizer)
    rows = {row["metric"]: row for row in evaluate_downstream(model, tokenizer, ["tiny_texts"], include_path=tasks,
                                                               batch_size=4, share_contexts=share_contexts,
                                                               equal_length_batches=equal_length_batches)}
    assert set(rows) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert all(row["higher_is_better"] is False and row["n_items"] == len(TEXTS) for row in rows.values())

    loglikelihood = np.array([direct_text_loglikelihood(model, tokenizer, text) for text in TEXTS])
    words = np.array([len(text.split()) for text in TEXTS], float)
    n_bytes = np.array([len(text.encode()) for text in TEXTS], float)
    per_word = loglikelihood.sum() / words.sum()
    assert rows["word_perplexity"]["value"] == pytest.approx(np.exp(-per_word), rel=1e-4)
    assert rows["bits_per_byte"]["value"] == pytest.approx(-loglikelihood.sum() / n_bytes.sum() / np.log(2), rel=1e-4)

    # the delta method against a bootstrap over texts of the log-likelihood per word: the same size
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(TEXTS), size=(4000, len(TEXTS)))
    boot = loglikelihood[draws].sum(1) / words[draws].sum(1)
    se = rows["word_perplexity"]["stderr"]
    assert 0 < se and 0.8 < se / rows["word_perplexity"]["value"] / boot.std() < 1.25
    residual = loglikelihood - per_word * words  # the formula itself
    expected = np.exp(-per_word) * np.sqrt(len(TEXTS) / (len(TEXTS) - 1) * (residual ** 2).sum()) / words.sum()
    assert se == pytest.approx(expected, rel=1e-3)


def test_perplexity_windows_of_one_length_score_as_hflm(tokenizer, tmp_path):
    """Texts longer than the window are cut into several rolling windows; scored in batches of one
    length across texts (`EqualLengthBatches`), they give HFLM's own perplexities."""
    data = tmp_path / "data" / "texts.jsonl"
    write_jsonl(data, [{"text": text} for text in TEXTS])
    tasks = write_perplexity_task("tiny_texts", data, tmp_path / "tasks").parent
    model = tiny_llama(tokenizer)
    window = 8
    assert sum(len(tokenizer(text)["input_ids"]) > window for text in TEXTS) > 2  # several windows per text

    def rows(equal_length_batches: bool) -> dict:
        return {row["metric"]: row["value"] for row in evaluate_downstream(
            model, tokenizer, ["tiny_texts"], include_path=tasks, batch_size=4, max_length=window,
            share_contexts=False, equal_length_batches=equal_length_batches)}

    plain, grouped = rows(False), rows(True)
    assert plain.keys() == grouped.keys() == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    for metric, value in plain.items():
        assert grouped[metric] == pytest.approx(value, rel=1e-5)


def test_perplexity_task_rejects_empty_texts(tmp_path):
    data = tmp_path / "texts.jsonl"
    write_jsonl(data, [{"text": "fine"}, {"text": "  "}])
    with pytest.raises(ValueError, match=r"texts.jsonl:2: 'text'"):
        write_perplexity_task("texts", data, tmp_path / "tasks")


def test_item_values_read_only_what_gives_the_row_value_again():
    """Per-item values are kept only when their mean (or, for a perplexity, their ratio of sums)
    gives lm-eval's value again, for the row's own filter; corpus-level metrics have none."""
    from editlib.eval.downstream import item_values

    samples = [{"doc_id": i, "filter": "none", "acc": float(i % 2), "bleu": ["ref", "pred"]} for i in range(4)]
    samples += [{"doc_id": i, "filter": "strict", "acc": 1.0} for i in range(4)]
    assert item_values(samples, "acc", 0.5) == {0: (0.0,), 1: (1.0,), 2: (0.0,), 3: (1.0,)}
    assert item_values(samples, "acc,strict", 1.0) == {i: (1.0,) for i in range(4)}
    assert item_values(samples, "acc", 0.6) is None  # aggregated otherwise than by the mean
    assert item_values(samples, "bleu", 10.0) is None
    texts = [{"doc_id": i, "word_perplexity": [-2.0 * words, words], "bits_per_byte": [-2.0 * words, 3 * words]}
             for i, words in enumerate((3, 5))]
    assert item_values(texts, "word_perplexity", math.exp(2.0)) == {0: (-6.0, 3.0), 1: (-10.0, 5.0)}
    assert item_values(texts, "bits_per_byte", 2 / 3 / math.log(2)) is None


def test_paired_errors_of_answers_and_of_texts():
    """Paired by item: 0/1 answers by matched proportions, which keeps an error when nothing
    changed, agrees with the per-question differences' sd over many changes and, like the exact
    sign test, finds 4 answers of 100 lost (p 0.125) no evidence of a change; other scores by the
    per-item differences; a perplexity's log change has no error when every text moves by the same
    amount per word, which the independent errors of the two sides do not see."""
    import scipy.stats

    from editlib.eval.downstream import item_change_stderr, ratio_stderr

    before = {i: (v,) for i, v in enumerate((1.0, 0.0, 1.0, 0.0))}
    assert item_change_stderr(before, before, "acc") == pytest.approx(1 / 6)  # sqrt(1) / (n + 2)
    assert item_change_stderr(before, {**before, 9: (1.0,)}, "acc") is None  # other questions
    rng = np.random.default_rng(0)
    many = rng.integers(0, 2, 10_000).astype(float)
    flipped = np.where(rng.random(10_000) < 0.1, 1 - many, many)
    wald = np.std(flipped - many, ddof=1) / 100
    assert item_change_stderr({i: (v,) for i, v in enumerate(many)}, {i: (v,) for i, v in enumerate(flipped)},
                              "acc") == pytest.approx(wald, rel=0.01)
    right = {i: (1.0,) for i in range(100)}
    lost_four = {i: (0.0 if i < 4 else 1.0,) for i in range(100)}
    assert scipy.stats.binomtest(4, 4).pvalue == pytest.approx(0.125)
    assert 0.04 - 1.959964 * item_change_stderr(right, lost_four, "acc") < 0
    assert 0.04 - 1.959964 * np.std([-1.0] * 4 + [0.0] * 96, ddof=1) / 10 > 0  # the plain sd would
    scores = {i: (v,) for i, v in enumerate((0.5, 0.25, 1.0, 0.0))}
    raised = {i: (v + d,) for i, (v, d) in enumerate(zip((0.5, 0.25, 1.0, 0.0), (0.0, 0.5, 0.0, 0.0)))}
    assert item_change_stderr(scores, raised, "f1") == pytest.approx(0.125)  # differences 0,.5,0,0: sd 0.25 / 2
    words = np.array([3.0, 5.0, 4.0])
    lls = np.array([-7.0, -9.0, -12.0])
    text_before = {i: (ll, n) for i, (ll, n) in enumerate(zip(lls, words))}
    text_after = {i: (ll - 0.1 * n, n) for i, (ll, n) in enumerate(zip(lls, words))}
    assert item_change_stderr(text_before, text_after, "word_perplexity") == pytest.approx(0.0, abs=1e-12)
    assert ratio_stderr(lls, words) > 0.1
    shuffled = {i: (ll - 0.1 * n, n) for i, (ll, n) in enumerate(zip(lls[::-1], words))}
    assert item_change_stderr(text_before, shuffled, "word_perplexity") == pytest.approx(
        ratio_stderr(lls[::-1] - 0.1 * words - lls, words))
    assert item_change_stderr(text_before, {**text_after, 0: (-7.0, 4.0)}, "word_perplexity") is None  # other words


def test_a_group_is_paired_through_its_leaves_with_its_own_weights():
    """A group's paired error combines its leaves' with the weights that give its value (by size
    or plain); with neither, none. Rows keep no per-item values once paired."""
    from editlib.eval.downstream import item_table, items_by_task, with_change_stderr

    def leaf(task, values):
        return {"group": "grp", "task": task, "metric": "acc", "value": float(np.mean(values)), "n_items": len(values),
                "items": {i: (v,) for i, v in enumerate(values)}}

    before = [leaf("x", [1.0, 0.0, 1.0, 0.0]), leaf("y", [1.0, 1.0])]
    reference = items_by_task(item_table(before))
    after_leaves = [leaf("x", [1.0, 1.0, 1.0, 0.0]), leaf("y", [0.0, 1.0])]
    se_x = math.sqrt(2 - 1 / 6) / 6  # matched proportions: (0, 1, 0, 0) is 0 lost and 1 gained of 4
    se_y = math.sqrt(2 - 1 / 4) / 4  # (-1, 0): 1 lost of 2
    for value, weights in ((4 / 6 * 0.75 + 2 / 6 * 0.5, (4 / 6, 2 / 6)), ((0.75 + 0.5) / 2, (0.5, 0.5))):
        rows = with_change_stderr([{"task": "grp", "metric": "acc", "value": value, "error": None}, *after_leaves],
                                  reference)
        assert [row["change_stderr"] for row in rows[1:]] == pytest.approx([se_x, se_y])
        assert rows[0]["change_stderr"] == pytest.approx(math.hypot(weights[0] * se_x, weights[1] * se_y))
        assert not any("items" in row for row in rows)
    [group, *_] = with_change_stderr([{"task": "grp", "metric": "acc", "value": 0.7, "error": None}, *after_leaves],
                                     reference)
    assert group["change_stderr"] is None
