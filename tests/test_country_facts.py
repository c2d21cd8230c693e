"""data.source country_facts: CounterFact-format records from the installed countryinfo package
(editlib.data.country_facts), their properties, the prepared file and its manifest, and the config."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from editlib.data.country_facts import (
    COMMON_NAMES,
    COUNTRY_RELATIONS,
    DISSOLVED,
    LANGUAGE_CORRECTIONS,
    LANGUAGE_NAMES,
    continent,
    country_answers,
    country_facts_records,
    country_facts_task,
    countryinfo_data,
    prepare_country_facts,
    read_countries,
    shuffled,
    unedited_fact_questions,
)
from editlib.data.fetch import AssetError, manifest_path
from editlib.data.qa_wikidata import parse_qa_wikidata_input, qa_wikidata_records
from editlib.data.records import load_requests, parse_records
from editlib.io import write_jsonl
from editlib.study.config import ConfigError, validate_config

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
LONG = REPO / "configs" / "smollm2-long.yaml"
CONTINENTS = {"Africa", "Asia", "Europe", "North America", "South America", "Oceania"}


@pytest.fixture(scope="module")
def countries():
    return read_countries()


@pytest.fixture(scope="module")
def answers(countries):
    return country_answers(countries)


@pytest.fixture(scope="module")
def records():
    return country_facts_records()


def relation_counts(records) -> Counter:
    return Counter(r["requested_rewrite"]["relation_id"] for r in records)


def test_records_load_as_counterfact_and_are_deterministic(records):
    requests = parse_records(records)
    assert [r.case_id for r in requests] == list(range(len(records)))
    assert country_facts_records() == records
    assert {r["source"] for r in records} == {"countryinfo"}
    assert country_facts_records(seed=1) != records  # the seed draws the counterfactual targets


def test_records_are_shuffled_so_the_first_ones_mix_the_relations(records):
    """The workflow edits the first n prepared records; qa_wikidata_records writes them relation by
    relation, so unshuffled the first 128 would all be P37. The shuffle keeps the same records."""
    first = relation_counts(records[:128])
    assert {"P30", "P37", "P47"} <= set(first), first
    assert max(first.values()) < 100, first
    def key(record):
        return (record["requested_rewrite"]["relation_id"], record["requested_rewrite"]["subject"])
    built = qa_wikidata_records(country_facts_task(), seed=0, relations=COUNTRY_RELATIONS, source="countryinfo",
                                exclude_subject=True)
    assert len({key(r) for r in built}) == len(built)
    assert sorted(map(key, records)) == sorted(map(key, built))
    assert [key(r) for r in records] != [key(r) for r in built]
    assert [key(r) for r in shuffled(built, 1)] != [key(r) for r in records]  # the seed draws the order


def test_every_relation_the_data_answers_has_records(records):
    counts = relation_counts(records)
    assert all(counts[relation] > 0 for relation in ("P30", "P37", "P47")), counts
    assert set(counts) <= {r.relation_id for r in COUNTRY_RELATIONS}
    # capitals name one country each: their records have no neighbourhood and come with min_neighbours=0
    everything = country_facts_records(min_neighbours=0)
    parse_records(everything)
    assert all(n > 0 for n in relation_counts(everything).values()) and set(relation_counts(everything)) == {
        r.relation_id for r in COUNTRY_RELATIONS}
    assert any(not r["neighborhood_prompts"] for r in everything)
    assert all(len(r["neighborhood_prompts"]) >= 1 for r in records)


def test_target_new_is_never_a_true_answer_nor_the_subject(records, answers):
    for record in records:
        rewrite = record["requested_rewrite"]
        subject, relation = rewrite["subject"], rewrite["relation_id"]
        true = answers[(relation, subject)]
        assert record["true_answers"] == true and rewrite["target_true"]["str"] == true[0]
        new = rewrite["target_new"]["str"].casefold()
        assert new not in {a.casefold() for a in true} and new != subject.casefold()


def test_neighbourhood_subjects_share_the_true_target(records, answers):
    for record in records:
        rewrite = record["requested_rewrite"]
        for prompt in record["neighborhood_prompts"]:
            relation, neighbour = parse_qa_wikidata_input(prompt, COUNTRY_RELATIONS)
            assert relation.relation_id == rewrite["relation_id"] and neighbour != rewrite["subject"]
            assert rewrite["target_true"]["str"] in answers[(relation.relation_id, neighbour)]
            assert rewrite["target_new"]["str"] not in answers[(relation.relation_id, neighbour)]


def test_prompts_name_the_subject_and_parse_back(records):
    for record in records:
        rewrite = record["requested_rewrite"]
        relation, subject = parse_qa_wikidata_input(rewrite["prompt"].format(rewrite["subject"]), COUNTRY_RELATIONS)
        assert (relation.relation_id, subject) == (rewrite["relation_id"], rewrite["subject"])
        assert all(rewrite["subject"] in prompt for prompt in record["paraphrase_prompts"])


def test_answers_are_what_a_model_would_say(countries, answers):
    names = [c.name for c in countries]
    # no inverted ("Virgin Islands, British") or qualified ("Saint Martin (French part)") forms
    assert len(set(names)) == len(names) and not [n for n in names if n.endswith(")") or "," in n]
    by_code = {c.alpha3: c for c in countries}
    for country in countries:
        if country.continent is not None:
            assert answers[("P30", country.name)] == [country.continent] and country.continent in CONTINENTS
        if country.borders:  # the true target: the most populous of the subject's own borders
            own = [by_code[code] for code in country.borders]
            first = answers[("P47", country.name)][0]
            assert first in {c.name for c in own}
            assert by_code[next(c.alpha3 for c in own if c.name == first)].population == max(c.population for c in own)
    assert not set(DISSOLVED) & set(by_code) and set(COMMON_NAMES) <= set(by_code)
    for relation, subject in answers:
        assert relation in {r.relation_id for r in COUNTRY_RELATIONS}
        assert answers[(relation, subject)] and len(set(answers[(relation, subject)])) == len(answers[(relation, subject)])


def test_every_language_code_of_the_installed_data_has_a_name():
    data = countryinfo_data()
    codes = {(entry["ISO"]["alpha3"], code) for entry in data.values()
             if isinstance(entry.get("ISO"), dict) and entry["ISO"].get("alpha3")
             for code in entry.get("languages") or []}
    missing = {code for alpha3, code in codes if code not in LANGUAGE_NAMES and (alpha3, code) not in LANGUAGE_CORRECTIONS}
    assert not missing, missing


def test_borders_listed_one_way_are_true_answers_both_ways(countries, answers):
    by_code = {c.alpha3: c for c in countries}
    for country in countries:
        for code in country.borders:
            other = by_code[code]
            assert country.name in answers.get(("P47", other.name), [country.name])  # none where other lists no border
            assert other.name in answers[("P47", country.name)]


def test_read_countries_on_made_up_entries(caplog):
    data = {
        "aland": {"name": "Aland", "ISO": {"alpha2": "AA", "alpha3": "AAA"}, "region": "Europe",
                  "subregion": "Northern Europe", "capital": "Mari", "languages": ["sv", "xx"], "borders": ["BB"],
                  "population": 10},
        "bland": {"name": "Bland", "ISO": {"alpha2": "BB", "alpha3": "BBB"}, "region": "Americas",
                  "subregion": "Latin America and the Caribbean", "intermediateregion": "Caribbean",
                  "capital": ["Bee"], "languages": ["en", "nn", "nb"], "borders": ["AAA"], "population": 5},
        "bland, republic of": {"name": "Bland, Republic of", "ISO": {"alpha3": "BBB"}},  # fewer fields: dropped
        "old union": {"name": "Old Union", "ISO": {"alpha3": "SCG"}, "region": "Europe", "capital": "X"},
        "no code": {"name": "No Code", "ISO": {"alpha2": "", "alpha3": ""}, "region": "Europe"},
    }
    with caplog.at_level("WARNING"):
        countries = read_countries(data)
    assert "'xx'" in caplog.text
    assert [(c.alpha3, c.name, c.continent, c.capitals, c.languages, c.borders) for c in countries] == [
        ("AAA", "Aland", "Europe", ("Mari",), ("Swedish",), ("BBB",)),
        ("BBB", "Bland", "North America", ("Bee",), ("English", "Norwegian"), ("AAA",)),
    ]


@pytest.mark.parametrize("entry, expected", [
    ({"region": "Americas", "subregion": "Northern America", "intermediateregion": ""}, "North America"),
    ({"region": "Americas", "subregion": "Latin America and the Caribbean", "intermediateregion": "Central America"}, "North America"),
    ({"region": "Americas", "subregion": "Latin America and the Caribbean", "intermediateregion": "South America"}, "South America"),
    ({"region": "Oceania", "subregion": "Australia and New Zealand"}, "Oceania"),
    ({"region": "Africa", "subregion": "Sub-Saharan Africa"}, "Africa"),
    ({"region": "", "subregion": ""}, None),
])
def test_continent_of_a_region(entry, expected):
    assert continent(entry) == expected


def test_prepare_writes_records_and_a_content_keyed_manifest(tmp_path, records):
    out = prepare_country_facts(tmp_path / "facts.json")
    assert json.loads(out.read_text(encoding="utf-8")) == records
    assert len(load_requests(out)) == len(records)
    manifest = json.loads(manifest_path(out).read_text(encoding="utf-8"))
    assert manifest["source"]["package"].startswith("countryinfo==") and manifest["n_records"] == len(records)
    written = out.stat().st_mtime_ns
    assert prepare_country_facts(tmp_path / "facts.json") == out and out.stat().st_mtime_ns == written  # fresh
    prepare_country_facts(tmp_path / "facts.json", seed=1)
    assert json.loads(manifest_path(out).read_text(encoding="utf-8"))["key"] != manifest["key"]
    assert json.loads(out.read_text(encoding="utf-8")) == country_facts_records(seed=1)


def test_prepare_data_writes_the_records_and_the_unedited_facts_task(tmp_path, monkeypatch, records):
    from editlib.data.downstream_tasks import read_mc_items
    from editlib.study import pipeline

    monkeypatch.setattr(pipeline, "prepare_wiki_corpus", lambda cache, path: Path(path).write_text("", encoding="utf-8"))
    monkeypatch.setattr(pipeline, "prepare_bigbench_mc", lambda *a, **k: pytest.fail("country_facts reads no BIG-bench task"))
    config = {"seed": 0, "data": {"source": "country_facts", "known_filter": False}, "asset_cache": str(tmp_path / "cache")}
    summary = pipeline.prepare_data(config, tmp_path / "data")
    assert summary["n_records"] == len(records)
    assert json.loads((tmp_path / "data" / "summary.json").read_text(encoding="utf-8"))["local_tasks"] == ["country_facts_unedited"]
    assert [r.subject for r in load_requests(tmp_path / "data" / "records.json")] == [
        r["requested_rewrite"]["subject"] for r in records]
    task = yaml.safe_load((tmp_path / "data" / "tasks" / "country_facts_unedited.yaml").read_text(encoding="utf-8"))
    items = read_mc_items(task["dataset_kwargs"]["data_files"]["test"])
    edited = {(r["requested_rewrite"]["relation_id"], r["requested_rewrite"]["subject"]) for r in records}
    assert items == unedited_fact_questions(edited, seed=0)
    assert len(items) == len(country_facts_records(min_neighbours=0)) - len(records)


def test_the_perplexity_task_holds_leads_the_statistics_never_read(tmp_path, monkeypatch, records):
    """downstream.tasks naming wikipedia_leads_perplexity: the data stage's params gain how many
    leads the statistics sample, and the task holds the next leads of the same seeded shuffle, none
    of them in the statistics' sample."""
    from editlib.data.corpus import load_corpus
    from editlib.study import pipeline
    from editlib.study.stages import stage_config

    leads = [{"title": f"T{i}", "text": f"Lead paragraph number {i}."} for i in range(60)]
    monkeypatch.setattr(pipeline, "prepare_wiki_corpus", lambda cache, path: write_jsonl(path, leads))
    config = copy.deepcopy(long_config())
    config["data"].update(known_filter=False, perplexity_texts=25)
    config["stats"]["n_samples"] = 20
    assert "perplexity_texts" not in stage_config(config, "prepare_data")
    config["downstream"]["tasks"].append("wikipedia_leads_perplexity")
    validate_config(config, SCHEMA, source=LONG.name)
    params = stage_config(config, "prepare_data")
    assert params["perplexity_texts"] == {"n_texts": 25, "statistics_documents": 20}

    pipeline.prepare_data(params, tmp_path / "data")
    corpus = tmp_path / "data" / "corpus.jsonl"
    task = yaml.safe_load((tmp_path / "data" / "tasks" / "wikipedia_leads_perplexity.yaml").read_text(encoding="utf-8"))
    assert task["output_type"] == "loglikelihood_rolling"
    texts = [json.loads(line)["text"] for line in open(task["dataset_kwargs"]["data_files"]["test"], encoding="utf-8")]
    statistics = load_corpus(str(corpus), n_samples=20, seed=config["seed"]).texts
    assert len(texts) == 25 == len(set(texts)) and not set(texts) & set(statistics)
    assert set(texts) | set(statistics) < {lead["text"] for lead in leads}
    summary = json.loads((tmp_path / "data" / "summary.json").read_text(encoding="utf-8"))
    assert summary["local_tasks"] == ["country_facts_unedited", "wikipedia_leads_perplexity"]

    params["perplexity_texts"]["statistics_documents"] = 60  # the statistics read every lead
    with pytest.raises(ValueError, match=r"stats\.n_samples \(60\) reads them all"):
        pipeline.prepare_data(params, tmp_path / "data2")


# ---------------------------------------------------------------------------- the unedited facts task


def test_unedited_questions_ask_every_fact_no_record_holds_with_its_true_answer(answers, records):
    edited = {(r["requested_rewrite"]["relation_id"], r["requested_rewrite"]["subject"]) for r in records}
    rows = unedited_fact_questions(edited, seed=0)
    prompts = {r.relation_id: r.prompt for r in COUNTRY_RELATIONS}
    asked = {(row["relation"], parse_qa_wikidata_input(row["question"], COUNTRY_RELATIONS)[1]) for row in rows}
    assert asked == set(answers) - edited and len(asked) == len(rows)
    # mostly capitals: they have no neighbourhood prompts, so no records
    assert Counter(row["relation"] for row in rows).most_common(2) == [("P1376", 242), ("P36", 241)]
    for row in rows:
        relation, subject = row["relation"], parse_qa_wikidata_input(row["question"], COUNTRY_RELATIONS)[1]
        assert row["question"] == prompts[relation].format(subject)
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
        assert row["choices"][row["answer"]] == answers[(relation, subject)][0]
        distractors = [c for i, c in enumerate(row["choices"]) if i != row["answer"]]
        assert not set(distractors) & (set(answers[(relation, subject)]) | {subject})
        assert all(any(d in answers[key] for key in answers if key[0] == relation) for d in distractors)


def test_unedited_questions_are_seeded_per_fact(records):
    edited = {(r["requested_rewrite"]["relation_id"], r["requested_rewrite"]["subject"]) for r in records}
    rows = unedited_fact_questions(edited, seed=0)
    assert unedited_fact_questions(edited, seed=0) == rows
    assert unedited_fact_questions(edited, seed=1) != rows
    # editing one more fact removes its question and leaves every other one as it was
    dropped = (rows[5]["relation"], parse_qa_wikidata_input(rows[5]["question"], COUNTRY_RELATIONS)[1])
    assert unedited_fact_questions(edited | {dropped}, seed=0) == rows[:5] + rows[6:]
    # where answers run out, the error names the relation and the subject
    with pytest.raises(AssetError, match=r"relation P1376 has \d+ answers to draw 299 distractors from for 'Abu Dhabi'"):
        unedited_fact_questions(edited, seed=0, n_choices=300)


# ---------------------------------------------------------------------------- config


def long_config() -> dict:
    return yaml.safe_load(LONG.read_text(encoding="utf-8"))


def test_the_config_accepts_country_facts_and_sizes_the_run_to_its_records(records):
    config = long_config()
    assert config["data"]["source"] == "country_facts"
    validate_config(config, SCHEMA, source=LONG.name)
    assert config["experiments"]["sequential"]["total_edits"] <= len(records)
    config["experiments"]["sequential"]["total_edits"] = len(records) + 1
    config["experiments"]["sequential"]["eval_at"] = [1]
    with pytest.raises(ConfigError, match=rf"smollm2-long\.yaml: experiments\.sequential\.total_edits: {len(records) + 1} "
                                          rf"records needed, data\.source country_facts builds {len(records)}$"):
        validate_config(config, SCHEMA, source=LONG.name)


def test_a_misspelt_source_is_rejected_naming_the_choices():
    config = copy.deepcopy(long_config())
    config["data"]["source"] = "country_fact"
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA, source=LONG.name)
    assert re.search(r"^smollm2-long\.yaml: data\.source: 'country_fact' is not one of \[.*'country_facts'", str(error.value))


def test_country_facts_has_only_its_unedited_facts_task():
    config = copy.deepcopy(long_config())
    assert config["downstream"]["tasks"] == ["country_facts_unedited"]
    config["downstream"]["tasks"] = ["bb_navigate"]
    with pytest.raises(ConfigError, match=r"downstream\.tasks\[0\]: 'bb_navigate' is not a task of data\.source "
                                          r"'country_facts' \(those are \['country_facts_unedited', "
                                          r"'wikipedia_leads_perplexity'\]\)"):
        validate_config(config, SCHEMA, source=LONG.name)
