"""Streaming a HF statistics corpus: one pass, memory bounded by the sample, uniform, seeded;
sampled by the prepare_data job into corpus.jsonl, which the statistics job reads."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest
import yaml

from editlib.data.corpus import load_corpus, read_prepared, sample_hf, sample_stream
from editlib.study import pipeline
from editlib.study.stages import stage_config

REPO = Path(__file__).resolve().parents[1]
WIKI = "hf:wikimedia/wikipedia:20231101.en:train"


class Text(str):
    """A document that counts how many of its kind are alive."""

    alive = 0

    def __new__(cls, value):
        Text.alive += 1
        return super().__new__(cls, value)

    def __del__(self):
        Text.alive -= 1


def test_sampling_holds_at_most_n_documents():
    n, seen = 20, []

    def rows():
        for i in range(2000):
            seen.append(Text.alive)  # documents alive when the sampler asks for the next row
            yield {"text": Text(f"document {i}"), "id": i}

    before = Text.alive
    sample = sample_stream(rows(), n, seed=3, progress=False)
    assert len(sample) == n == len(set(sample))
    assert max(seen) - before <= n  # the kept ones only: never the whole stream
    assert max(seen) - before == n  # ... and the heap did fill up


def test_sample_is_seeded_and_reads_no_row_count():
    rows = [{"text": f"d{i}"} for i in range(300)]
    first = sample_stream(iter(rows), 10, seed=1, progress=False)  # an iterator: no len()
    assert sample_stream(iter(rows), 10, seed=1, progress=False) == first
    assert sample_stream(iter(rows), 10, seed=2, progress=False) != first
    assert sample_stream(iter(rows), 300, seed=1, progress=False) != [r["text"] for r in rows]  # shuffled order
    assert sorted(sample_stream(iter(rows), 500, seed=1, progress=False)) == sorted(r["text"] for r in rows)


def test_every_document_is_equally_likely():
    """12 documents, 4 drawn, 3000 seeds: each document is drawn 1000 times in expectation
    (sd 26); a sampler that favours some positions misses the +-130 band by far."""
    rows = [{"text": str(i)} for i in range(12)]
    drawn, first = Counter(), Counter()
    for seed in range(3000):
        sample = sample_stream(iter(rows), 4, seed=seed, progress=False)
        assert len(set(sample)) == 4
        drawn.update(sample)
        first[sample[0]] += 1
    assert set(drawn) == {str(i) for i in range(12)}
    assert all(abs(count - 1000) < 130 for count in drawn.values()), drawn
    assert all(abs(count - 250) < 80 for count in first.values()), first  # the order is random too


def test_missing_text_field_names_the_dataset_and_field():
    with pytest.raises(ValueError, match=r"corpus hf:x/y: row 2 has no string field 'text' \(fields: \['body'\]\)"):
        sample_stream(iter([{"text": "a"}, {"text": "b"}, {"body": "c"}]), 2, 0, source="corpus hf:x/y", progress=False)


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answering with a small in-memory stream; records its calls."""
    calls = []
    table = {"id": [str(i) for i in range(200)], "title": [f"T{i}" for i in range(200)],
             "text": [f"Article {i} about topic {i % 7}." for i in range(200)]}

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        if args[0] == "no/such":
            raise FileNotFoundError("Dataset 'no/such' doesn't exist on the Hub")
        columns = {k: v for k, v in table.items() if args[0] != "notext/x" or k != "text"}
        return datasets.Dataset.from_dict(columns).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hf_corpus_is_streamed_with_the_hub_call_shape(fake_hub):
    corpus = load_corpus(WIKI, n_samples=50, seed=0)
    assert fake_hub == [(("wikimedia/wikipedia", "20231101.en"), {"split": "train", "streaming": True})]
    assert len(corpus.texts) == 50 and corpus.name == WIKI
    assert corpus == sample_hf(WIKI, 50, 0)
    with pytest.raises(ValueError, match=r"corpus hf:notext/x: the dataset has no text field 'text' \(columns: \['id', 'title'\]\)"):
        sample_hf("hf:notext/x", 5, 0)
    with pytest.raises(RuntimeError, match=r"corpus hf:no/such: cannot open datasets\.load_dataset\('no/such'"):
        sample_hf("hf:no/such", 5, 0)
    with pytest.raises(ValueError, match="needs n_samples"):
        load_corpus(WIKI)


def paper_config() -> dict:
    return yaml.safe_load((REPO / "configs" / "llama3-8b.yaml").read_text(encoding="utf-8"))


def test_prepare_data_samples_the_stream_and_statistics_reads_only_that(fake_hub, tmp_path):
    config = paper_config()
    config["stats"]["n_samples"] = 30
    prepare = stage_config(config, "prepare_data")
    assert prepare["corpus_sample"] == {"corpus": WIKI, "n_samples": 30}
    statistics = stage_config(config, "statistics")
    assert statistics["stats"]["corpus"] == WIKI and "n_samples" not in statistics["stats"]

    source = tmp_path / "counterfact.json"
    source.write_text(json.dumps([{
        "case_id": 0, "requested_rewrite": {"prompt": "{} is in", "subject": "Kotor", "relation_id": "P1",
                                            "target_new": {"str": "Paris"}, "target_true": {"str": "Rome"}},
        "paraphrase_prompts": ["p"], "neighborhood_prompts": ["n"], "generation_prompts": []}]))
    prepare["data"] = {**prepare["data"], "counterfact": str(source)}
    summary = pipeline.prepare_data(prepare, tmp_path / "data")
    corpus_path = tmp_path / "data" / "corpus.jsonl"
    prepared = read_prepared(corpus_path, WIKI)
    assert prepared == sample_hf(WIKI, 30, config["seed"])  # same documents, order and fingerprint
    assert summary["corpus_documents"] == 30 and summary["corpus_fingerprint"] == prepared.fingerprint
    assert len(corpus_path.read_text().splitlines()) == 30


def test_statistics_job_reads_the_prepared_sample_without_the_hub(tiny_llama, llama_tokenizer, tmp_path, monkeypatch):
    from editlib.editing.statistics import load_moments

    def offline(*args, **kwargs):
        raise AssertionError("the statistics job must not open the dataset")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    model_dir = tmp_path / "model"
    tiny_llama.save_pretrained(model_dir)
    llama_tokenizer.save_pretrained(model_dir)
    corpus_path = tmp_path / "corpus.jsonl"
    corpus_path.write_text("".join(json.dumps({"text": f"Lake Zurich was born in Paris {i}."}) + "\n" for i in range(12)))
    config = {"seed": 0, "model": {}, "statistics_layers": [1],
              "stats": {"corpus": WIKI, "max_length": 32, "cache_dir": str(tmp_path / "cache")}}
    result = pipeline.compute_statistics(config, model_dir, corpus_path, tmp_path / "m.safetensors")
    assert result["layers"] == [1] and result["tokens"][1] > 12
    assert sorted(load_moments(tmp_path / "m.safetensors")) == [1]
    corpus_path.write_text("")
    with pytest.raises(ValueError, match=r"corpus\.jsonl: the prepared sample of hf:wikimedia/wikipedia.* is empty"):
        pipeline.compute_statistics(config, model_dir, corpus_path, tmp_path / "m.safetensors")


def test_local_corpora_keep_their_params_and_sampling():
    default = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    assert "corpus_sample" not in stage_config(default, "prepare_data")
    assert stage_config(default, "statistics")["stats"] == default["stats"]
