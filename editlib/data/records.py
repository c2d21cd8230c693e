"""Edit requests: CounterFact and ZsRE records loaded into one typed form, validated.

Errors name the file, the record (index and case id) and the field, so a malformed third-party
dataset fails loudly instead of producing a wrong number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ZSRE_LOC_PREFIX = "nq question: "


class RecordError(ValueError):
    """A dataset record is malformed; the message names file, record and field."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to edit, with the prompts used to measure the edit.

    `prompt` is a template holding "{}" where `subject` goes. For ZsRE `target_true` is the true
    answer when known, else None; its specificity is scored against `neighborhood_answers`.
    """

    case_id: int | str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    relation_id: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_answers: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    source: Literal["counterfact", "zsre"] = "counterfact"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def text(self) -> str:
        """The edit prompt with the subject filled in."""
        return self.prompt.format(self.subject)


def _where(path: str | Path | None, index: int, case_id: Any) -> str:
    name = str(path) if path is not None else "<records>"
    return f"{name}: record {index} (case_id={case_id!r})"


def _get(record: dict, dotted: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise RecordError(f"{where}: missing field '{dotted}'")
        value = value[part]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise RecordError(f"{where}: field '{dotted}' must be {names}, got {type(value).__name__}")
    return value


def _string_list(record: dict, key: str, where: str, required: bool = False) -> tuple[str, ...]:
    if key not in record:
        if required:
            raise RecordError(f"{where}: missing field '{key}'")
        return ()
    values = record[key]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise RecordError(f"{where}: field '{key}' must be a list of strings")
    return tuple(values)


def validate_request(request: EditRequest, where: str) -> None:
    """Check the invariants every editor relies on; raise RecordError naming the field."""
    if request.prompt.count("{}") != 1:
        raise RecordError(f"{where}: field 'prompt' must contain exactly one '{{}}' placeholder: {request.prompt!r}")
    if not request.subject.strip():
        raise RecordError(f"{where}: field 'subject' is empty")
    if not request.target_new.strip():
        raise RecordError(f"{where}: field 'target_new' is empty")
    if request.target_true is not None:
        if not request.target_true.strip():
            raise RecordError(f"{where}: field 'target_true' is empty")
        if request.target_true.strip() == request.target_new.strip():
            raise RecordError(f"{where}: fields 'target_new' and 'target_true' are identical ({request.target_new!r})")
    if request.neighborhood_answers and len(request.neighborhood_answers) != len(request.neighborhood_prompts):
        raise RecordError(f"{where}: field 'neighborhood_answers' must match 'neighborhood_prompts' in length")


def counterfact_request(record: dict, where: str) -> EditRequest:
    """Map one CounterFact record to an EditRequest."""
    case_id = _get(record, "case_id", where, (int, str))
    rewrite = _get(record, "requested_rewrite", where, dict)
    prompt = _get(record, "requested_rewrite.prompt", where)
    subject = _get(record, "requested_rewrite.subject", where)
    if "{}" not in prompt:
        if subject and subject in prompt:
            prompt = prompt.replace(subject, "{}", 1)
        else:
            raise RecordError(f"{where}: field 'requested_rewrite.prompt' has no '{{}}' and does not contain the subject {subject!r}")
    request = EditRequest(
        case_id=case_id,
        prompt=prompt,
        subject=subject,
        target_new=_get(record, "requested_rewrite.target_new.str", where),
        target_true=_get(record, "requested_rewrite.target_true.str", where),
        relation_id=rewrite.get("relation_id"),
        paraphrase_prompts=_string_list(record, "paraphrase_prompts", where),
        neighborhood_prompts=_string_list(record, "neighborhood_prompts", where),
        generation_prompts=_string_list(record, "generation_prompts", where),
        source="counterfact",
    )
    validate_request(request, where)
    return request


def zsre_request(record: dict, where: str, target: Literal["answers", "alt"] = "answers") -> EditRequest:
    """Map one ZsRE (MEND-eval) record to an EditRequest.

    `target="answers"` follows MEMIT/UME (`target_new = answers[0]`); `"alt"` follows EasyEdit
    (`target_new = alt`, and `answers[0]`, the true answer, becomes `target_true`).
    """
    case_id = record.get("case_id", record.get("id", where.rsplit("record ", 1)[-1].split(" ")[0]))
    src = _get(record, "src", where)
    subject = _get(record, "subject", where)
    if subject not in src:
        raise RecordError(f"{where}: field 'subject' ({subject!r}) does not occur in field 'src' ({src!r})")
    if target == "answers":
        answers = _get(record, "answers", where, list)
        if not answers or not isinstance(answers[0], str):
            raise RecordError(f"{where}: field 'answers' must be a non-empty list of strings")
        target_new = answers[0]
        target_true = None
    else:
        target_new = _get(record, "alt", where)
        answers = record.get("answers")
        target_true = answers[0] if isinstance(answers, list) and answers and isinstance(answers[0], str) else None
        if target_true is not None and target_true.strip() == target_new.strip():
            target_true = None  # an alternative equal to the answer: no true object to compare with
    loc = _get(record, "loc", where)
    loc_ans = _get(record, "loc_ans", where)
    # an NQ question ("nq question: who ...") is asked with "?"; any other loc is a prompt as it is
    loc_prompt = loc[len(ZSRE_LOC_PREFIX):] + "?" if loc.startswith(ZSRE_LOC_PREFIX) else loc
    request = EditRequest(
        case_id=case_id,
        prompt=src.replace(subject, "{}", 1),
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=(_get(record, "rephrase", where),),
        neighborhood_prompts=(loc_prompt,),
        neighborhood_answers=(loc_ans,),
        source="zsre",
    )
    validate_request(request, where)
    return request


def read_json_records(path: str | Path) -> list[dict]:
    """Read a JSON list or JSON-lines file strictly as UTF-8; errors name the file and line."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise RecordError(f"{path}: line {line}: not valid UTF-8 (byte offset {err.start})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}: line {err.lineno}: invalid JSON: {err.msg}") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RecordError(f"{path}: line {lineno}: invalid JSON: {err.msg}") from None
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise RecordError(f"{_where(path, index, None)}: must be a JSON object")
    return records


def parse_records(
    records: Sequence[dict],
    kind: Literal["counterfact", "zsre"] = "counterfact",
    path: str | Path | None = None,
    zsre_target: Literal["answers", "alt"] = "answers",
) -> list[EditRequest]:
    """Turn raw records into validated EditRequests; case ids must be unique."""
    requests: list[EditRequest] = []
    seen: dict[Any, int] = {}
    for index, record in enumerate(records):
        where = _where(path, index, record.get("case_id"))
        if kind == "counterfact":
            request = counterfact_request(record, where)
        elif kind == "zsre":
            request = zsre_request({"case_id": index, **record}, where, target=zsre_target)
        else:
            raise ValueError(f"unknown record kind {kind!r} (expected 'counterfact' or 'zsre')")
        if request.case_id in seen:
            raise RecordError(f"{where}: field 'case_id' duplicates record {seen[request.case_id]}")
        seen[request.case_id] = index
        requests.append(request)
    return requests


def load_requests(
    path: str | Path,
    kind: Literal["counterfact", "zsre"] = "counterfact",
    limit: int | None = None,
    zsre_target: Literal["answers", "alt"] = "answers",
) -> list[EditRequest]:
    """Load and validate a CounterFact or ZsRE file (JSON list or JSON lines)."""
    records = read_json_records(path)
    requests = parse_records(records, kind=kind, path=path, zsre_target=zsre_target)
    return requests[:limit] if limit is not None else requests


def record_kind(requests: Sequence[EditRequest]) -> str:
    """counterfact or zsre: the one kind of records in `requests` (mixing kinds is an error)."""
    kinds = {request.source for request in requests}
    if len(kinds) != 1:
        raise ValueError(f"requests must be of one record kind, got {sorted(kinds) or 'none'}")
    return kinds.pop()


def counterfact_record(request: EditRequest) -> dict:
    """The CounterFact JSON form of a request (for writing generated datasets)."""
    return {
        "case_id": request.case_id,
        "requested_rewrite": {
            "prompt": request.prompt,
            "subject": request.subject,
            "relation_id": request.relation_id,
            "target_new": {"str": request.target_new},
            "target_true": {"str": request.target_true},
        },
        "paraphrase_prompts": list(request.paraphrase_prompts),
        "neighborhood_prompts": list(request.neighborhood_prompts),
        "generation_prompts": list(request.generation_prompts),
    }


def zsre_record(request: EditRequest) -> dict:
    """The ZsRE (MEND-eval) JSON form of a CounterFact request with a true object: the edit prompt
    as `src`, `alt` the new object, `answers` the true one, the first paraphrase as `rephrase`,
    the first neighbourhood prompt as `loc` (a prompt, not an NQ question) with the true object
    as its answer (CounterFact's neighbours share the relation and the true object)."""
    if request.target_true is None or not request.neighborhood_prompts:
        raise ValueError(f"case_id={request.case_id}: a ZsRE record needs target_true and a neighbourhood prompt")
    return {
        "case_id": request.case_id,
        "subject": request.subject,
        "src": request.text,
        "answers": [request.target_true],
        "alt": request.target_new,
        "rephrase": request.paraphrase_prompts[0] if request.paraphrase_prompts else request.text,
        "loc": request.neighborhood_prompts[0],
        "loc_ans": request.target_true,
    }


def batches(items: Sequence, size: int) -> Iterable[Sequence]:
    """Consecutive slices of `items` of length `size` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]
