"""CounterFact-format edit records built from BIG-bench qa_wikidata: relation templates, subjects
located in the question, neighbourhood prompts from the same relation."""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editlib.data.bigbench import BIGBENCH_GITHUB, BIGBENCH_SDIST, bigbench_task_member, read_bigbench_tasks
from editlib.data.fetch import AssetError, PackageArchive, TaskFileMirror, asset_manifest, is_fresh, manifest_path
from editlib.data.records import EditRequest, counterfact_record, parse_records
from editlib.io import content_key, write_json

# ---------------------------------------------------------------------------- qa_wikidata -> CounterFact


@dataclass(frozen=True)
class RelationTemplate:
    """A qa_wikidata relation: the Wikidata property, its prompt ("{}" = subject) and paraphrases."""

    relation_id: str
    prompt: str
    paraphrases: tuple[str, ...]

    def pattern(self) -> re.Pattern:
        prefix, suffix = self.prompt.split("{}")
        return re.compile("^" + re.escape(prefix) + "(?P<subject>.+?)" + re.escape(suffix) + "$")


def _rel(relation_id: str, prompt: str, *paraphrases: str) -> RelationTemplate:
    return RelationTemplate(relation_id, prompt, paraphrases)


# Prompts exactly as BIG-bench qa_wikidata words them; paraphrases written for this table.
QA_WIKIDATA_RELATIONS: tuple[RelationTemplate, ...] = (
    _rel("P27", "The country of citizenship of {} is", "{} is a citizen of", "{} holds citizenship of"),
    _rel("P17", "The country of {} is", "{} is located in the country of", "{} belongs to the country of"),
    _rel("P103", "The native language of {} is", "The mother tongue of {} is", "{} is a native speaker of"),
    _rel("P407", "The language of {} is", "The original language of {} is", "{} was written in the language"),
    _rel("P140", "The religion of {} is", "{} follows the religion of", "{} is affiliated with the religion"),
    _rel("P1303", "The instrument of {} is", "{} plays the", "{} is known for playing the"),
    _rel("P37", "The official language of {} is", "In {}, the official language is", "The official language spoken in {} is"),
    _rel("P131", "{} is located in", "{} can be found in", "{} lies in"),
    _rel("P641", "The sport played by {} is", "{} plays the sport of", "{} is a professional athlete in the sport of"),
    _rel("P2936", "The language used in {} is", "The language spoken in {} is", "In {}, people speak"),
    _rel("P47", "{} shares a border with", "{} borders", "{} is adjacent to"),
    _rel("P1340", "The eye color of {} is", "{} has eyes of the color", "The color of the eyes of {} is"),
    _rel("P495", "The original country of {} is", "The country of origin of {} is", "{} originated in"),
    _rel("P36", "The capital of {} is", "The capital city of {} is", "{} has its capital in"),
    _rel("P30", "The continent of {} is", "{} is located on the continent of", "{} is part of the continent of"),
    _rel("P136", "The genre of {} is", "{} belongs to the genre of", "{} is best known for the genre"),
    _rel("P413", "The team position of {} is", "{} plays in the position of", "On the team, {} plays as"),
    _rel("P462", "The color of {} is", "{} has the color", "{} is colored"),
    _rel("P1376", "{} is capital of", "{} is the capital city of", "{} serves as the capital of"),
    _rel("P1532", "The country for sport played by {} is", "In sport, {} represents", "{} competes for the country of"),
    _rel("P1412", "The languages spoken, written or signed by {} is", "{} speaks the language", "{} is fluent in"),
    _rel("P1399", "{} convicted of", "{} was convicted of", "{} was found guilty of"),
    _rel("P410", "The military rank of {} is", "{} held the military rank of", "{} served with the rank of"),
    _rel("P2852", "The emergency phone number of {} is", "In {}, the emergency phone number is", "To call emergency services in {}, dial"),
    _rel("P159", "The headquarters location of {} is", "{} is headquartered in", "The headquarters of {} are in"),
    _rel("P186", "The material used in {} is", "{} is made of", "{} was built from"),
    _rel("P97", "The noble title of {} is", "{} held the noble title of", "{} bore the title of"),
    _rel("P412", "The voice type of {} is", "{} sings with the voice type", "The singing voice of {} is"),
    _rel("P122", "The basic form of government of {} is", "{} is governed as a", "The form of government of {} is"),
    _rel("P1853", "The blood type of {} is", "{} has the blood type", "The blood group of {} is"),
    _rel("P551", "The residence of {} is", "{} lives in", "{} resides in"),
    _rel("P1269", "{} is facet of", "{} is an aspect of", "{} is a facet of"),
    _rel("P172", "The ethnic group of {} is", "{} belongs to the ethnic group", "The ethnicity of {} is"),
    _rel("P2341", "{} is indigenous to", "{} is native to", "{} originates from"),
    _rel("P6886", "{} writing languages", "{} wrote in", "The writing language of {} is"),
    _rel("P205", "The basin country of {} is", "The basin of {} lies in", "{} drains through the country of"),
    _rel("P264", "The record label of {} is", "{} is signed to the record label", "{} records for the label"),
    _rel("P921", "The main subject of {} is", "{} is mainly about", "The topic of {} is"),
    _rel("P512", "The academic degree of {} is", "{} holds the academic degree of", "{} earned the degree of"),
    _rel("P735", "{} given name", "The given name of {} is", "The first name of {} is"),
    _rel("P138", "{} named after", "{} is named after", "{} was named in honour of"),
    _rel("P38", "The currency of {} is", "The currency used in {} is", "In {}, people pay with the"),
    _rel("P7959", "The historic county of {} is", "{} lies in the historic county of", "Historically, {} is part of the county of"),
    _rel("P156", "{} is followed by", "{} comes before", "Right after {} comes"),
    _rel("P155", "{} follows", "{} comes after", "{} is preceded by"),
    _rel("P1995", "The health specialty of {} is", "{} is treated in the medical specialty of", "The medical specialty of {} is"),
    _rel("P3075", "The official religion of {} is", "The state religion of {} is", "{} has the official religion"),
    _rel("P1313", "The office held by head of government of {} is", "The head of government of {} holds the office of", "The government of {} is led by the"),
    _rel("P111", "The measured physical quantity of {} is", "{} is a unit of", "{} measures"),
    _rel("P183", "{} endemic to", "{} is endemic to", "{} is found only in"),
    _rel("P178", "The developer of {} is", "{} was developed by", "{} is made by"),
    _rel("P141", "The IUCN conservation status of {} is", "The conservation status of {} is", "According to the IUCN, {} is"),
    _rel("P832", "The public holiday of {} is", "A public holiday in {} is", "{} celebrates the public holiday"),
    _rel("P734", "The family name of {} is", "The surname of {} is", "The last name of {} is"),
    _rel("P449", "The original broadcaster of {} is", "{} was first broadcast by", "{} originally aired on"),
)

_MASK_SUFFIX = " [MASK]"


def _longest_first(relations: Sequence[RelationTemplate]) -> list[tuple[RelationTemplate, re.Pattern]]:
    return [(relation, relation.pattern()) for relation in sorted(relations, key=lambda r: -len(r.prompt))]


def _parse_input(text: str, compiled: list[tuple[RelationTemplate, re.Pattern]]) -> tuple[RelationTemplate, str] | None:
    text = text.strip()
    if text.endswith(_MASK_SUFFIX):
        text = text[: -len(_MASK_SUFFIX)]
    for relation, pattern in compiled:
        match = pattern.match(text)
        if match and match.group("subject").strip():
            return relation, match.group("subject").strip()
    return None


def parse_qa_wikidata_input(text: str, relations: Sequence[RelationTemplate] = QA_WIKIDATA_RELATIONS) -> tuple[RelationTemplate, str] | None:
    """(relation, subject) of one qa_wikidata input, or None if no template in `relations` fits.

    The longest template wins, so "The country of citizenship of X is" is not read as
    "The country of {} is" with subject "citizenship of X". A trailing " [MASK]" is ignored.
    """
    return _parse_input(text, _longest_first(relations))


def qa_wikidata_records(
    task: Mapping[str, Any],
    *,
    seed: int = 0,
    max_neighbours: int = 10,
    min_neighbours: int = 1,
    relations: Sequence[RelationTemplate] = QA_WIKIDATA_RELATIONS,
    source: str = "bigbench/qa_wikidata",
    exclude_subject: bool = False,
) -> list[dict]:
    """CounterFact-format records from a BIG-bench qa_wikidata task, built as CounterFact was.

    - subject and relation: parsed with `relations` (inputs no template fits are skipped); repeated
      (relation, subject) pairs are merged, their answers united;
    - target_true: the first answer; target_new: a seeded uniform draw from the other distinct
      answers of the same relation (never one of the subject's own answers; with `exclude_subject`,
      never the subject itself either, so no "X shares a border with X");
    - paraphrase_prompts: the relation's paraphrase templates with the subject;
    - neighborhood_prompts: the relation's prompt for up to `max_neighbours` other subjects (seeded
      draw) whose answers include target_true and exclude target_new, so target_true stays right;
      records with fewer than `min_neighbours` are dropped;
    - generation_prompts: the prompt and paraphrases.
    Every draw uses its own ``random.Random`` keyed on (seed, relation, subject), so one record does
    not change when others are added or dropped. Records are sorted by relation table order, then
    subject; case ids are 0..n-1 in that order. Each record also carries ``true_answers`` (all of
    the subject's answers) and ``source`` (`source`: where the facts come from).
    `task` may come from elsewhere than BIG-bench: any ``{"examples": [{"input": prompt, "target":
    [answers]}]}`` whose inputs are prompts of `relations` (editlib.data.country_facts).
    """
    examples = task.get("examples")
    if not isinstance(examples, list):
        raise AssetError("qa_wikidata task: no 'examples' list")
    answers: dict[tuple[str, str], list[str]] = {}
    by_id = {relation.relation_id: relation for relation in relations}
    compiled = _longest_first(relations)
    for example in examples:
        parsed = _parse_input(str(example.get("input", "")), compiled)
        if parsed is None:
            continue
        relation, subject = parsed
        target = example.get("target")
        targets = [target] if isinstance(target, str) else [t for t in target or [] if isinstance(t, str)]
        targets = [t.strip() for t in targets if t.strip()]
        known = answers.setdefault((relation.relation_id, subject), [])
        known.extend(t for t in targets if t not in known)
    # object pools and (relation, object) -> subjects
    pools: dict[str, set[str]] = defaultdict(set)
    holders: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (relation_id, subject), subject_answers in answers.items():
        pools[relation_id].update(subject_answers)
        for answer in subject_answers:
            holders[(relation_id, answer)].append(subject)
    order = {relation.relation_id: index for index, relation in enumerate(relations)}
    requests: list[EditRequest] = []
    extras: list[dict] = []
    for (relation_id, subject), subject_answers in sorted(answers.items(), key=lambda item: (order[item[0][0]], item[0][1])):
        if not subject_answers:
            continue
        relation = by_id[relation_id]
        rng = random.Random(f"{seed}|{relation_id}|{subject}")
        target_true = subject_answers[0]
        own = {a.casefold() for a in subject_answers} | ({subject.casefold()} if exclude_subject else set())
        candidates = sorted(a for a in pools[relation_id] if a.casefold() not in own)
        if not candidates:
            continue
        target_new = rng.choice(candidates)
        neighbours = sorted(
            other for other in set(holders[(relation_id, target_true)])
            if other != subject and target_new not in answers[(relation_id, other)]
        )
        neighbours = rng.sample(neighbours, min(max_neighbours, len(neighbours)))
        if len(neighbours) < min_neighbours:
            continue
        paraphrases = tuple(template.format(subject) for template in relation.paraphrases)
        requests.append(
            EditRequest(
                case_id=len(requests),
                prompt=relation.prompt,
                subject=subject,
                target_new=target_new,
                target_true=target_true,
                relation_id=relation_id,
                paraphrase_prompts=paraphrases,
                neighborhood_prompts=tuple(relation.prompt.format(other) for other in neighbours),
                generation_prompts=(relation.prompt.format(subject), *paraphrases),
            )
        )
        extras.append({"true_answers": list(subject_answers), "source": source})
    records = [{**counterfact_record(request), **extra} for request, extra in zip(requests, extras)]
    parse_records(records)  # every record must load as a CounterFact record
    return records


QA_WIKIDATA_MEMBER = bigbench_task_member("qa_wikidata")


def prepare_qa_wikidata(
    cache_dir: str | Path,
    out_path: str | Path,
    *,
    seed: int = 0,
    max_neighbours: int = 10,
    min_neighbours: int = 1,
    archive: PackageArchive = BIGBENCH_SDIST,
    mirror: TaskFileMirror | None = BIGBENCH_GITHUB,
) -> Path:
    """Write CounterFact-format records from BIG-bench qa_wikidata (a JSON list) to `out_path`; returns it.

    See `qa_wikidata_records` for how records are built and `read_bigbench_tasks` for where the
    task file comes from; load the records with ``editlib.data.records.load_requests(out_path)``.
    """
    out_path = Path(out_path)
    params = {"member": QA_WIKIDATA_MEMBER, "seed": seed, "max_neighbours": max_neighbours,
              "min_neighbours": min_neighbours, "relations": content_key([vars(r) for r in QA_WIKIDATA_RELATIONS]), "converter": 1}
    manifest = asset_manifest("qa_wikidata_counterfact", archive, params)
    if is_fresh(out_path, manifest_path(out_path), manifest):
        return out_path
    task = read_bigbench_tasks(cache_dir, ["qa_wikidata"], archive=archive, mirror=mirror)["qa_wikidata"]
    records = qa_wikidata_records(task, seed=seed, max_neighbours=max_neighbours, min_neighbours=min_neighbours)
    if not records:
        raise AssetError(f"{QA_WIKIDATA_MEMBER}: no records could be built from it")
    write_json(out_path, records)
    write_json(manifest_path(out_path), {**manifest, "n_records": len(records)})
    return out_path
