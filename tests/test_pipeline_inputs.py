"""Malformed inputs at the workflow's entry points: the error names file, record and field, and
nothing is left behind."""

from __future__ import annotations

import json

import pytest

from editlib.data.records import RecordError
from editlib.study.pipeline import prepare_data


def cf(case_id=0, prompt="The mother tongue of {} is", subject="Danielle Darrieux", new="English", true="French"):
    return {"case_id": case_id, "requested_rewrite": {"prompt": prompt, "subject": subject, "relation_id": "P103",
            "target_new": {"str": new}, "target_true": {"str": true}},
            "paraphrase_prompts": ["p"], "neighborhood_prompts": ["n"], "generation_prompts": []}


GOOD = cf(case_id=10, subject="Toko Yasuda")
CASES = {
    "missing field": ([GOOD, {"case_id": 3, "requested_rewrite": {"prompt": "{} is", "subject": "X"}}],
                      r"record 1 .*requested_rewrite\.target_new\.str"),
    "subject absent": ([GOOD, cf(case_id=4, prompt="The mother tongue of someone is")], r"record 1 .*requested_rewrite\.prompt"),
    "empty target": ([GOOD, cf(case_id=5, new="")], r"record 1 .*target_new"),
    "identical targets": ([GOOD, cf(case_id=6, new="French")], r"record 1 .*target_new' and 'target_true"),
    "duplicate case id": ([GOOD, cf(case_id=10)], r"record 1 .*case_id.*duplicates record 0"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_counterfact_stops_prepare_data(case, tmp_path):
    records, message = CASES[case]
    source = tmp_path / "counterfact.json"
    source.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "data"
    config = {"seed": 0, "data": {"source": "counterfact", "counterfact": str(source)}}
    with pytest.raises(RecordError, match=message) as err:
        prepare_data(config, out)
    assert str(source) in str(err.value)
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_non_utf8_records_stop_prepare_data(tmp_path):
    source = tmp_path / "counterfact.jsonl"
    source.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"case_id": "\xff"}\n')
    out = tmp_path / "data"
    config = {"seed": 0, "data": {"source": "counterfact", "counterfact": str(source)}}
    with pytest.raises(RecordError, match=r"counterfact\.jsonl: line 2: not valid UTF-8"):
        prepare_data(config, out)
    assert not out.exists() or not any(out.iterdir())


def test_valid_counterfact_is_prepared(tmp_path):
    source = tmp_path / "counterfact.json"
    source.write_text(json.dumps([GOOD, cf(case_id=11)]), encoding="utf-8")
    out = tmp_path / "data"
    prepare_data({"seed": 0, "data": {"source": "counterfact", "counterfact": str(source)}}, out)
    assert json.loads((out / "records.json").read_text()) == [GOOD, cf(case_id=11)]
    assert sorted(p.name for p in out.iterdir()) == ["corpus.jsonl", "records.json", "summary.json", "tasks"]


def test_edit_samples_are_disjoint_consecutive_blocks(tmp_path):
    from editlib.study.pipeline import edit_requests

    records = list(range(10))
    samples = [edit_requests(records, 3, tmp_path / "records.json", sample) for sample in range(3)]
    assert samples == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match=r"records\.json: edit sample 3 of 3 records needs 12 records, the file has 10"):
        edit_requests(records, 3, tmp_path / "records.json", 3)
