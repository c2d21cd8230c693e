"""Tokenization (BOS-safe subject index, BOS-free targets) and record validation."""

import json

import pytest
import torch

from editlib.data.records import RecordError, load_requests, parse_records
from editlib.model.tokens import TokenizationError, ragged_index, subject_last_indices, target_ids


@pytest.mark.parametrize("fixture", ["llama_tokenizer", "gpt2_tokenizer"])
def test_subject_last_index_points_at_subject_end(request, fixture):
    tok = request.getfixturevalue(fixture)
    templates = ["The mother tongue of {} is", "{} plays the", "Hello. The headquarters of {} is in"]
    subjects = ["Danielle Darrieux", "Toko Yasuda", "Apple A5"]
    indices = subject_last_indices(tok, templates, subjects)
    for template, subject, index in zip(templates, subjects, indices):
        full = tok(template.format(subject))["input_ids"]
        head = tok(template[: template.index("{}")] + subject)["input_ids"]
        assert full[: len(head)] == head  # the subject's tokens are a prefix of the prompt's
        assert index == len(head) - 1
        suffix = tok.decode(full[index + 1 :])
        assert template.endswith(suffix) and subject.endswith(tok.decode(full[index : index + 1]).strip())


def test_bos_counted_once(llama_tokenizer, gpt2_tokenizer):
    # "{}" at the start: index = number of subject tokens (+1 for BOS on Llama-style tokenizers)
    n_subject = len(gpt2_tokenizer("Toko Yasuda")["input_ids"])
    assert subject_last_indices(gpt2_tokenizer, ["{} is"], ["Toko Yasuda"]) == [n_subject - 1]
    n_llama = len(llama_tokenizer("Toko Yasuda", add_special_tokens=False)["input_ids"])
    assert subject_last_indices(llama_tokenizer, ["{} is"], ["Toko Yasuda"]) == [n_llama]  # BOS at 0


def test_target_ids_have_no_bos(llama_tokenizer):
    ids = target_ids(llama_tokenizer, ["English", " Paris"])
    assert llama_tokenizer.bos_token_id not in ids[0] + ids[1]
    assert ids[0] == llama_tokenizer(" English", add_special_tokens=False)["input_ids"]
    assert ids[1] == llama_tokenizer(" Paris", add_special_tokens=False)["input_ids"]


def test_ragged_index_lists_each_item_with_its_row_and_place():
    row, offset = ragged_index(torch.tensor([2, 0, 3, 1]))
    assert row.tolist() == [0, 0, 2, 2, 2, 3]
    assert offset.tolist() == [0, 1, 0, 1, 2, 0]
    empty_row, empty_offset = ragged_index(torch.tensor([0, 0], dtype=torch.long))
    assert empty_row.numel() == empty_offset.numel() == 0


def test_tokenization_errors(llama_tokenizer):
    with pytest.raises(TokenizationError, match="empty"):
        target_ids(llama_tokenizer, ["  "])
    with pytest.raises(TokenizationError, match="placeholder|'\\{\\}'"):
        subject_last_indices(llama_tokenizer, ["no placeholder"], ["X"])


def cf(case_id=0, prompt="The mother tongue of {} is", subject="Danielle Darrieux", new="English", true="French"):
    return {"case_id": case_id, "requested_rewrite": {"prompt": prompt, "subject": subject, "relation_id": "P103",
            "target_new": {"str": new}, "target_true": {"str": true}},
            "paraphrase_prompts": ["p"], "neighborhood_prompts": ["n"], "generation_prompts": []}


@pytest.mark.parametrize("record, field", [
    (cf(prompt="The mother tongue of someone is"), "requested_rewrite.prompt"),
    (cf(new=""), "target_new"),
    (cf(new="French"), "target_new' and 'target_true"),
    ({"case_id": 3, "requested_rewrite": {"prompt": "{} is", "subject": "X"}}, "requested_rewrite.target_new.str"),
    ({**cf(), "paraphrase_prompts": "not a list"}, "paraphrase_prompts"),
])
def test_bad_records_name_record_and_field(record, field, tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([cf(case_id=10, subject="Toko Yasuda"), record]))
    with pytest.raises(RecordError) as err:
        load_requests(path)
    message = str(err.value)
    assert str(path) in message and "record 1" in message and field in message


def test_duplicate_case_ids_and_bad_utf8(tmp_path):
    with pytest.raises(RecordError, match="record 1 .*case_id.*duplicates record 0"):
        parse_records([cf(), cf()])
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(cf()).encode() + b"\n" + b'{"case_id": "\xff"}\n')
    with pytest.raises(RecordError, match="line 2: not valid UTF-8"):
        load_requests(path)


def test_zsre_mapping():
    record = {"subject": "Kotor", "src": "What country is Kotor in?", "rephrase": "Kotor is in which country?",
              "alt": "Spain", "answers": ["Montenegro"], "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}
    (memit_style,) = parse_records([record], kind="zsre")
    (easyedit_style,) = parse_records([record], kind="zsre", zsre_target="alt")
    assert memit_style.prompt == "What country is {} in?" and memit_style.target_new == "Montenegro"
    assert easyedit_style.target_new == "Spain"
    assert memit_style.neighborhood_prompts == ("who wrote hamlet?",)
    assert memit_style.neighborhood_answers == ("Shakespeare",)
    with pytest.raises(RecordError, match="subject"):
        parse_records([{**record, "src": "What country is it in?"}], kind="zsre")
