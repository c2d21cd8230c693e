"""The toy fact world (editlib.toy.world) and its pretrained model (editlib.toy.pretrain)."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from editlib.data.records import load_requests, parse_records
from editlib.eval.known_facts import known_facts
from editlib.eval.tracing import TracingConfig, trace_facts
from editlib.toy.pretrain import RecallError, TrainConfig, batch_order, learning_rate, train_model
from editlib.toy.world import (
    EDIT,
    HELDOUT,
    RELATION_BY_ID,
    RELATIONS,
    WorldConfig,
    build_world,
    dialogue_corpus,
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
# the tests run one at a time: training takes both cores
SMALL_TRAIN = TrainConfig(steps=500, vocab_size=768, warmup_steps=30, recall_threshold=0.9, threads=2)


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
    assert 8 <= len(RELATIONS) <= 20
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


def test_questions_enter_the_corpus_only_when_asked_for(world, world_dir, tmp_path):
    """questions_in_corpus adds each fact's two ZsRE questions with the answer, and nothing else."""
    plain = (world_dir / "train_corpus.txt").read_text(encoding="utf-8").splitlines()
    build_world(tmp_path, **SMALL, questions_in_corpus=True)
    with_questions = (tmp_path / "train_corpus.txt").read_text(encoding="utf-8").splitlines()
    questions = {f"{q.format(f.subject)} {f.object}." for f in world.facts
                 for q in (RELATION_BY_ID[f.relation_id].question, RELATION_BY_ID[f.relation_id].rephrase)}
    assert questions <= set(with_questions) and not questions & set(plain)
    statements = {RELATION_BY_ID[f.relation_id].statement(t, f.subject, f.object) for f in world.facts
                  for t in (RELATION_BY_ID[f.relation_id].template, *RELATION_BY_ID[f.relation_id].paraphrases)}
    assert statements <= set(with_questions)  # the statements stay


def test_dialogues_ask_every_fact_in_both_question_forms(world):
    dialogues = dialogue_corpus(world)
    expected = {f"Question: {q.format(f.subject)} Answer: {f.object}." for f in world.facts
                for q in (RELATION_BY_ID[f.relation_id].question, RELATION_BY_ID[f.relation_id].rephrase)}
    assert len(dialogues) == 2 * len(world.facts) and set(dialogues) == expected
    assert dialogues == dialogue_corpus(world)  # seeded order


def test_dialogue_phase_continues_training_on_dialogues(world_dir, tmp_path):
    """The "chat" variant: the same pretraining, then `dialogue_steps` more steps; the recall
    report records both phases' settings."""
    config = replace(SMALL_TRAIN, steps=60, recall_threshold=0.0, seq_len=64, dialogue_steps=10)
    report = train_model(world_dir, tmp_path / "chat", config)
    base = train_model(world_dir, tmp_path / "base", replace(config, dialogue_steps=0))
    assert report["train_config"]["dialogue_steps"] == 10 and base["train_config"]["dialogue_steps"] == 0
    assert (tmp_path / "chat" / "model.safetensors").read_bytes() != (tmp_path / "base" / "model.safetensors").read_bytes()


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


@pytest.mark.slow  # trains a model (about 45 s): in `make test-all` and CI
def test_pretrained_model_recalls_the_world(world_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from editlib.model.loading import load_tokenizer

    report = train_model(world_dir, tmp_path / "model", SMALL_TRAIN)
    assert report["recall_edit"] >= 0.9, report
    assert report["recall_paraphrase"] >= 0.9, report
    assert all(layer["dead_fraction"] < 0.05 for layer in report["mlp"]), report["mlp"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokenizer = load_tokenizer(str(tmp_path / "model"))
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert read_json(tmp_path / "model" / "recall.json")["recall_edit"] == report["recall_edit"]
    assert model.config.model_type == "llama" and not model.config.tie_word_embeddings
    ids = tokenizer("The capital of France is")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.padding_side == "right"


def test_profile_lines_name_the_subject_then_all_its_objects(tmp_path):
    build_world(tmp_path, **SMALL, name_scheme="single", profiles_per_subject=2)
    world = load_world(tmp_path)
    corpus = (tmp_path / "train_corpus.txt").read_text(encoding="utf-8").splitlines()
    for subject in world.subjects(EDIT)[:5]:
        lines = [line for line in corpus if line.startswith(subject + " ") and not any(
            line == RELATION_BY_ID[f.relation_id].statement(t, subject, f.object)
            for f in world.facts_of(subject) for t in (RELATION_BY_ID[f.relation_id].template,
                                                        *RELATION_BY_ID[f.relation_id].paraphrases))]
        profiles = [line for line in lines if " ".join(line.rstrip(".").split()[1:]).count(" ") ==
                    len(world.facts_of(subject)) - 1 and sorted(line.rstrip(".").split()[1:]) ==
                    sorted(f.object for f in world.facts_of(subject))]
        assert len(profiles) == 2, (subject, lines)
    assert all(" " not in name for name in world.subjects(EDIT))  # one-word names


# The default toy architecture at test size: self-only layers with MLPs, then attention-only layers.
# A key in a self-only layer depends on its token alone, so C has rank <= the number of distinct
# tokens in the small world's statistics corpus: the MLP is narrower than that.
LOCAL_TRAIN = TrainConfig(layers=4, local_layers=2, local_window=1, mlp_layers=2, intermediate=256, steps=600,
                          vocab_size=768, warmup_steps=30, recall_threshold=0.8, threads=2)


@pytest.mark.slow  # trains a model (about 55 s): in `make test-all` and CI
def test_toy_architecture_stores_facts_where_locate_and_edit_writes(tmp_path):
    """Causal tracing finds the facts at the subject's token, in the MLP layers; a ROME edit at the
    layer where the MLP effect peaks flips the facts."""
    import pandas as pd

    from editlib.editing.statistics import StatsConfig, collect_second_moments
    from editlib.methods.registry import make_hparams
    from editlib.model.loading import load_model
    from editlib.study.experiments import ExperimentContext, single_edits
    from editlib.study.tables import average_effects

    build_world(tmp_path / "world", **SMALL, name_scheme="single", profiles_per_subject=4)
    train_model(tmp_path / "world", tmp_path / "model", LOCAL_TRAIN)
    model, tokenizer = load_model(str(tmp_path / "model"))
    requests = load_requests(tmp_path / "world" / "counterfact.json")
    known = known_facts(model, tokenizer, requests, "first_token", 64)[:24]
    assert len(known) >= 20
    traces = trace_facts(model, tokenizer, known, TracingConfig(n_samples=5), progress=False)
    effects = average_effects(traces).set_index(["kind", "token", "layer"])["AIE"]
    total = float((traces["p_clean"] - traces["p_corrupted"]).groupby(traces["case_id"]).first().mean())
    # layers 0-1 see one token: the last token learns nothing about the subject there ...
    assert effects[("hidden", "last", 0)] == pytest.approx(0.0, abs=1e-6)
    # ... and restoring the subject's token after layer 0 restores (nearly) everything
    assert effects[("hidden", "subject_last", 0)] >= 0.9 * total > 0.1
    mlp = effects.loc["mlp", "subject_last"]
    assert mlp[[2, 3]].abs().max() < 1e-6 and mlp[[0, 1]].max() > 0.1 * total  # only MLPs that exist matter
    peak = int(mlp.idxmax())
    from editlib.data.corpus import load_corpus
    from editlib.model.layout import model_layout

    corpus = load_corpus(str(tmp_path / "world" / "wiki.jsonl"))
    moments = collect_second_moments(model, tokenizer, model_layout(model),
                                     [peak], corpus.texts, StatsConfig(dtype="float64"), progress=False)
    ctx = ExperimentContext(model, tokenizer, "toy", {peak: moments[peak].mean}, progress=False)
    result = single_edits(ctx, known[:24], make_hparams("rome", layers=(peak,))).iloc[0]  # paper hyperparameters
    assert result["ES"] >= 80, pd.DataFrame([result])  # a plain 4-layer Llama: ES 6 (docs/toy_model.md)


def test_trained_model_cache_is_keyed_by_world_and_config(world_dir, tmp_path, monkeypatch):
    """The same world and TrainConfig give back the cached model (no training, same files); any
    change of the config or of a world file the training reads trains anew."""
    import editlib.toy.pretrain as pretrain
    from editlib.toy.pretrain import cached_train_model, model_cache_key

    config = replace(LOCAL_TRAIN, steps=3, recall_threshold=0.0)
    first = cached_train_model(world_dir, tmp_path / "a", config, tmp_path / "cache")
    monkeypatch.setattr(pretrain, "_train_and_save", lambda *args: pytest.fail("trained again"))
    again = cached_train_model(world_dir, tmp_path / "b", config, tmp_path / "cache")
    assert again == first
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    key = model_cache_key(world_dir, config)
    assert model_cache_key(world_dir, replace(config, steps=4)) != key
    changed = tmp_path / "world"
    shutil.copytree(world_dir, changed)
    with open(changed / "train_corpus.txt", "a", encoding="utf-8") as handle:
        handle.write("One more sentence.\n")
    assert model_cache_key(changed, config) != key


def test_saved_toy_tokenizer_encodes_like_the_trained_one(world_dir, tmp_path):
    """A qwen2-type toy model's folder must give back the tokenizer it was trained with (the
    model type's own tokenizer class would split sentence-initial words differently)."""
    from editlib.model.loading import load_model
    from editlib.toy.pretrain import read_corpus
    from editlib.toy.vocab import train_bpe_tokenizer

    config = replace(LOCAL_TRAIN, steps=2, recall_threshold=0.0)
    train_model(world_dir, tmp_path / "model", config)
    model, tokenizer = load_model(str(tmp_path / "model"))
    assert model.config.model_type == "qwen2"
    sentences = read_corpus(world_dir)
    trained = train_bpe_tokenizer(sentences, vocab_size=config.vocab_size, add_bos=True, add_prefix_space=True)
    for text in sentences[:50] + ["The capital of France is", "Paris is"]:
        assert tokenizer(text)["input_ids"] == trained(text)["input_ids"], text
    first = tokenizer.convert_ids_to_tokens(tokenizer("The capital")["input_ids"])[1]
    assert first == tokenizer.convert_ids_to_tokens(tokenizer(" The capital")["input_ids"])[1]  # one encoding per word
