"""The toy fact world (editlib.toyworld) and its pretrained model (editlib.pretrain)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from editlib.pretrain import RecallError, TrainConfig, batch_order, learning_rate, train_model
from editlib.records import load_requests, parse_records
from editlib.toyworld import (
    EDIT,
    HELDOUT,
    RELATION_BY_ID,
    RELATIONS,
    WorldConfig,
    build_world,
    load_world,
    make_world,
)

SMALL = {"seed": 0, "n_subjects": 40}
WORLD_FILES = (
    "train_corpus.txt",
    "wiki.jsonl",
    "counterfact.json",
    "zsre.json",
    "tasks/toy_facts.jsonl",
    "tasks/toy_compose.jsonl",
    "world.json",
)
# Small enough to train in well under a minute on one core; recall must still reach 0.9.
SMALL_TRAIN = TrainConfig(steps=500, vocab_size=768, warmup_steps=30, recall_threshold=0.9)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toyworld")
    build_world(out, **SMALL)
    return out


@pytest.fixture(scope="module")
def world(world_dir):
    return load_world(world_dir)


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def template_subject(template: str, text: str) -> str | None:
    """The subject that fills `template` to give `text`, or None."""
    head, tail = template.split("{}")
    match = re.fullmatch(re.escape(head) + "(.+)" + re.escape(tail), text)
    return match.group(1) if match else None


def mentions(text: str, subject: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(subject)}(?![\w])", text) is not None


# --------------------------------------------------------------------------- determinism


def test_same_seed_writes_identical_files(world_dir, tmp_path):
    build_world(tmp_path, **SMALL)
    for name in WORLD_FILES:
        assert (tmp_path / name).read_bytes() == (world_dir / name).read_bytes(), name


def test_different_seed_writes_different_world(world_dir, tmp_path):
    summary = build_world(tmp_path, **{**SMALL, "seed": 1})
    assert summary["world_key"] != read_json(world_dir / "world.json")["world_key"]
    for name in ("train_corpus.txt", "counterfact.json", "zsre.json", "tasks/toy_facts.jsonl"):
        assert (tmp_path / name).read_bytes() != (world_dir / name).read_bytes(), name


def test_world_json_round_trips(world, world_dir):
    rebuilt = make_world(WorldConfig(**SMALL))
    assert world.facts == rebuilt.facts
    assert world.splits == rebuilt.splits
    assert world.config == rebuilt.config


# --------------------------------------------------------------------------- knowledge base


def test_relations_are_counterfact_like():
    assert 8 <= len(RELATIONS) <= 15
    for relation in RELATIONS:
        assert 5 <= len(relation.objects) <= 12, relation.name
        assert all(" " not in obj for obj in relation.objects), relation.name
        assert 2 <= len(relation.paraphrases) <= 4, relation.name
        for template in (relation.template, *relation.paraphrases):
            assert template.count("{}") == 1 and not template.endswith((" ", ".")), template
        assert relation.question.count("{}") == 1 and relation.rephrase.count("{}") == 1


def test_every_fact_is_in_training_corpus(world, world_dir):
    corpus = set((world_dir / "train_corpus.txt").read_text(encoding="utf-8").splitlines())
    for fact in world.facts:
        relation = RELATION_BY_ID[fact.relation_id]
        for template in (relation.template, *relation.paraphrases):
            assert relation.statement(template, fact.subject, fact.object) in corpus


def test_wiki_documents_are_text_about_the_world(world, world_dir):
    documents = read_jsonl(world_dir / "wiki.jsonl")
    assert len(documents) == world.config.wiki_docs_per_subject * len(world.kinds)
    assert all(set(doc) == {"text"} and doc["text"].count(".") >= 2 for doc in documents)


# --------------------------------------------------------------------------- records


def test_records_validate(world_dir):
    counterfact = load_requests(world_dir / "counterfact.json", kind="counterfact")
    zsre = load_requests(world_dir / "zsre.json", kind="zsre")
    assert len(counterfact) == len(zsre) > 0
    assert all(len(r.paraphrase_prompts) == 2 and r.generation_prompts for r in counterfact)
    assert all(r.neighborhood_answers and r.paraphrase_prompts for r in zsre)


def test_counterfact_targets_are_relation_objects(world, world_dir):
    for request in parse_records(read_json(world_dir / "counterfact.json")):
        relation = RELATION_BY_ID[request.relation_id]
        assert world.object_of(request.subject, request.relation_id) == request.target_true
        assert request.target_new in relation.objects and request.target_new != request.target_true
        assert all(mentions(p, request.subject) for p in request.paraphrase_prompts)


def test_neighbourhood_prompts_share_relation_and_true_object(world, world_dir):
    records = read_json(world_dir / "counterfact.json")
    n_checked = 0
    for record in records:
        rewrite = record["requested_rewrite"]
        for prompt in record["neighborhood_prompts"]:
            subject = template_subject(rewrite["prompt"], prompt)
            assert subject is not None and subject != rewrite["subject"], prompt
            assert world.object_of(subject, rewrite["relation_id"]) == rewrite["target_true"]["str"]
            assert world.splits[subject] == HELDOUT
            n_checked += 1
        assert len(record["neighborhood_prompts"]) <= world.config.max_neighborhood
    assert n_checked > 0


def test_zsre_records_ask_about_edit_facts(world, world_dir):
    for record in read_json(world_dir / "zsre.json"):
        assert world.splits[record["subject"]] == EDIT
        assert record["src"].endswith("?") and record["rephrase"].endswith("?")
        assert record["answers"][0] != record["alt"]
        assert record["loc"].startswith("nq question: ")


def test_edited_subjects_are_disjoint_from_downstream_tasks(world, world_dir):
    edited = {r["requested_rewrite"]["subject"] for r in read_json(world_dir / "counterfact.json")}
    edited |= {r["subject"] for r in read_json(world_dir / "zsre.json")}
    assert edited <= set(world.subjects(EDIT))
    for task in ("toy_facts", "toy_compose"):
        rows = read_jsonl(world_dir / "tasks" / f"{task}.jsonl")
        assert rows, task
        for row in rows:
            assert not any(mentions(row["question"], subject) for subject in edited), row["question"]


def test_task_rows_are_well_formed_multiple_choice(world, world_dir):
    for task in ("toy_facts", "toy_compose"):
        for row in read_jsonl(world_dir / "tasks" / f"{task}.jsonl"):
            assert set(row) == {"question", "choices", "answer"}
            assert len(row["choices"]) == len(set(row["choices"])) == world.config.n_choices
            assert 0 <= row["answer"] < len(row["choices"])


# --------------------------------------------------------------------------- pretraining


def test_learning_rate_warms_up_then_decays():
    config = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    rates = [learning_rate(step, config) for step in range(config.steps)]
    assert rates[0] < rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert rates[-1] >= 1e-4 - 1e-12


def test_batch_order_is_seeded_and_covers_every_row():
    lengths = [5 + (i * 7) % 11 for i in range(50)]
    config = TrainConfig(steps=20, batch_size=10, bucket_batches=5)  # window = one epoch
    order = batch_order(lengths, config)
    assert order == batch_order(lengths, config)
    assert order != batch_order(lengths, replace(config, seed=1))
    assert len(order) == 20 and all(len(batch) == 10 for batch in order)
    assert sorted(row for batch in order[:5] for row in batch) == list(range(50))  # epoch 1


def test_low_recall_raises_after_saving(world_dir, tmp_path):
    config = TrainConfig(layers=1, hidden=32, intermediate=64, steps=2, batch_size=8, vocab_size=512,
                         warmup_steps=1, recall_threshold=0.5)
    with pytest.raises(RecallError, match="recall on edit prompts"):
        train_model(world_dir, tmp_path / "model", config)
    assert read_json(tmp_path / "model" / "recall.json")["passed"] is False


def test_pretrained_model_recalls_the_world(world_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = train_model(world_dir, tmp_path / "model", SMALL_TRAIN)
    assert report["recall_edit"] >= 0.9, report
    assert report["recall_paraphrase"] >= 0.9, report
    assert all(layer["dead_fraction"] < 0.05 for layer in report["mlp"]), report["mlp"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert read_json(tmp_path / "model" / "recall.json")["recall_edit"] == report["recall_edit"]
    assert model.config.model_type == "llama" and not model.config.tie_word_embeddings
    ids = tokenizer("The capital of France is")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.padding_side == "right"
