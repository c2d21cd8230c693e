"""CounterFact-format edit records about countries, from the `countryinfo` package on PyPI.

The source (``data.source: country_facts``): real-world facts that PyPI still offers, for the
real-model tier where BIG-bench qa_wikidata (whose ``bigbench==1.0.0`` archive left PyPI) cannot be
fetched. ``countryinfo==1.0.1`` (a project dependency, pyproject.toml) ships one JSON file per
country or territory; it is MIT-licensed (Copyright (c) 2018 Porimol Chandro, the LICENSE in its
wheel covers the package and its data files; its README says the data is sourced primarily from
Wikipedia). It is read as its users read it, ``CountryInfo.all()``, and turned into qa_wikidata
prompts ("The continent of France is") that `editlib.data.qa_wikidata.qa_wikidata_records` makes
into records exactly as it does BIG-bench's, with ``"source": "countryinfo"``.

Relations (the qa_wikidata templates, `COUNTRY_RELATIONS`):

- P37 official language: the package's ISO 639-1 codes named in English (`LANGUAGE_NAMES`,
  Norwegian for no/nb/nn); the first listed language is the true target;
- P47 shares a border with: the package's land borders (ISO alpha-3) as country names, the most
  populous neighbour first (the true target); the borders are not always listed both ways, so a
  country that lists the subject is appended to its answers: never drawn as its target_new, never
  its true target; the subject itself is never its target_new either;
- P30 continent: the package's UN M49 region, the Americas split into "North America" (Northern
  America, Central America, the Caribbean) and "South America"; "Oceania" for Oceania (not
  "Australia"); the two without a region (Antarctica, Heard Island and McDonald Islands) have none;
- P36 capital and P1376 capital of: a capital's name is one country's (Kingston, of Jamaica and of
  Norfolk Island, is the exception), so these records have no neighbourhood prompts: with the
  default ``min_neighbours=1`` (the workflow's) only Jamaica's and Norfolk Island's P36 records
  survive; ``min_neighbours=0`` builds them all (records.py accepts records without neighbourhood
  prompts; their NS is NaN, left out of the means).

Countries: every entry with an ISO alpha-3 code, one per code (the fullest entry where the package
has two: Myanmar, not Burma), less two states dissolved before the package's data (`DISSOLVED`),
under the package's English name except where it is not the common name (`COMMON_NAMES`: "Vatican
City", "North Macedonia", ...). Territories (Guam, Réunion, ...) are included; a model knows few of
them, which the known-fact filter (data.known_filter) handles.

Records come in a seeded shuffle (`shuffled`, the config's seed), so an experiment that edits the
first n records edits a mix of the relations (qa_wikidata_records writes them relation by relation,
official languages first). countryinfo 1.0.1, seed 0, the
defaults: 595 records (P37 186, P47 160, P36 2, P30 247) of 249 countries and territories; 1131
with ``min_neighbours=0`` (P37 236, P47 163, P36 243, P30 247, P1376 242).
"""

from __future__ import annotations

import importlib.metadata
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editlib.data.fetch import AssetError, is_fresh, manifest_path
from editlib.data.qa_wikidata import QA_WIKIDATA_RELATIONS, RelationTemplate, qa_wikidata_records
from editlib.data.downstream_tasks import choice_row
from editlib.io import content_key, write_json

log = logging.getLogger(__name__)

COUNTRYINFO_REQUIREMENT = "countryinfo==1.0.1"
SOURCE = "countryinfo"

COUNTRY_RELATION_IDS = ("P37", "P47", "P36", "P30", "P1376")
# in QA_WIKIDATA_RELATIONS's order, which is the records' order
COUNTRY_RELATIONS: tuple[RelationTemplate, ...] = tuple(r for r in QA_WIKIDATA_RELATIONS if r.relation_id in COUNTRY_RELATION_IDS)

# ISO 639-1 code -> the English name a model would say; every code in countryinfo 1.0.1's data
# (tests/test_country_facts.py checks the installed data has no other). "rs" is the package's
# spelling of Serbian's "sr" (Serbia's entry).
LANGUAGE_NAMES: dict[str, str] = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "ay": "Aymara", "az": "Azerbaijani",
    "be": "Belarusian", "bg": "Bulgarian", "bi": "Bislama", "bn": "Bengali", "bs": "Bosnian",
    "ca": "Catalan", "ch": "Chamorro", "cnr": "Montenegrin", "cs": "Czech", "da": "Danish",
    "de": "German", "dv": "Dhivehi", "dz": "Dzongkha", "el": "Greek", "en": "English",
    "es": "Spanish", "et": "Estonian", "fa": "Persian", "ff": "Fula", "fi": "Finnish",
    "fj": "Fijian", "fo": "Faroese", "fr": "French", "ga": "Irish", "gn": "Guarani",
    "gv": "Manx", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "ht": "Haitian Creole",
    "hu": "Hungarian", "hy": "Armenian", "id": "Indonesian", "is": "Icelandic", "it": "Italian",
    "ja": "Japanese", "ka": "Georgian", "kg": "Kongo", "kk": "Kazakh", "kl": "Greenlandic",
    "km": "Khmer", "ko": "Korean", "ku": "Kurdish", "ky": "Kyrgyz", "la": "Latin",
    "lb": "Luxembourgish", "ln": "Lingala", "lo": "Lao", "lt": "Lithuanian", "lu": "Luba-Katanga",
    "lv": "Latvian", "mg": "Malagasy", "mh": "Marshallese", "mi": "Maori", "mk": "Macedonian",
    "mn": "Mongolian", "ms": "Malay", "mt": "Maltese", "my": "Burmese", "na": "Nauruan",
    "nb": "Norwegian", "nd": "Northern Ndebele", "ne": "Nepali", "nl": "Dutch", "nn": "Norwegian",
    "no": "Norwegian", "nr": "Southern Ndebele", "ny": "Chichewa", "oc": "Occitan", "pa": "Punjabi",
    "pl": "Polish", "ps": "Pashto", "pt": "Portuguese", "qu": "Quechua", "rn": "Kirundi",
    "ro": "Romanian", "rs": "Serbian", "ru": "Russian", "rw": "Kinyarwanda", "sg": "Sango",
    "si": "Sinhala", "sk": "Slovak", "sl": "Slovene", "sm": "Samoan", "sn": "Shona",
    "so": "Somali", "sq": "Albanian", "sr": "Serbian", "ss": "Swazi", "st": "Sotho",
    "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "tg": "Tajik", "th": "Thai",
    "ti": "Tigrinya", "tk": "Turkmen", "tn": "Tswana", "to": "Tongan", "tr": "Turkish",
    "ts": "Tsonga", "uk": "Ukrainian", "ur": "Urdu", "uz": "Uzbek", "ve": "Venda",
    "vi": "Vietnamese", "xh": "Xhosa", "zh": "Chinese", "zu": "Zulu",
}
# (alpha-3, code) -> name where the package's code names another language: Aruba's "pa" is
# Papiamento (which has no ISO 639-1 code), not Punjabi.
LANGUAGE_CORRECTIONS: dict[tuple[str, str], str] = {("ABW", "pa"): "Papiamento"}

# alpha-3 -> the common English name (Wikipedia's article title) where the package's name is a
# formal or inverted form, or a former name.
COMMON_NAMES: dict[str, str] = {
    "VAT": "Vatican City",                      # "Vatican City State", "Holy See (Vatican City State)"
    "VGB": "British Virgin Islands",            # "Virgin Islands, British"
    "VIR": "United States Virgin Islands",      # "Virgin Islands, U.S."
    "MAF": "Saint Martin",                      # "Saint Martin (French part)"
    "SXM": "Sint Maarten",                      # "Sint Maarten (Dutch part)"
    "BES": "Caribbean Netherlands",             # "Bonaire, Sint Eustatius and Saba"
    "MKD": "North Macedonia",                   # "Republic of Macedonia" (renamed 2019)
    "SWZ": "Eswatini",                          # "Swaziland" (renamed 2018)
}
# Entries of states that no longer exist (alpha-3 -> why), left out.
DISSOLVED: dict[str, str] = {"ANT": "Netherlands Antilles, dissolved 2010", "SCG": "Serbia and Montenegro, dissolved 2006"}

# UN M49 region -> continent (the Americas by subregion and intermediate region, `continent`)
_CONTINENTS = {"Africa": "Africa", "Asia": "Asia", "Europe": "Europe", "Oceania": "Oceania"}


@dataclass(frozen=True)
class Country:
    """One country as the records use it: answers already in the words a model would say."""

    alpha3: str
    name: str
    continent: str | None
    capitals: tuple[str, ...]
    languages: tuple[str, ...]
    borders: tuple[str, ...]  # alpha-3 codes, as the package lists them
    population: int


def countryinfo_data() -> dict[str, dict]:
    """The installed countryinfo package's entries, ``CountryInfo.all()`` ({lowercase name: entry})."""
    try:
        from countryinfo import CountryInfo
    except ImportError:
        raise AssetError(f"data.source country_facts reads the countryinfo package; install it with "
                         f"`pip install {COUNTRYINFO_REQUIREMENT}` (a dependency in pyproject.toml)") from None
    return CountryInfo.all()


def countryinfo_version() -> str:
    try:
        return importlib.metadata.version("countryinfo")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def continent(entry: Mapping[str, Any]) -> str | None:
    """The continent of a countryinfo entry: its UN M49 region, the Americas split into North
    America (Northern America, Central America, the Caribbean) and South America; None without one."""
    region = entry.get("region") or ""
    if region in _CONTINENTS:
        return _CONTINENTS[region]
    if region == "Americas":
        if entry.get("subregion") == "Northern America":
            return "North America"
        return {"South America": "South America", "Central America": "North America",
                "Caribbean": "North America"}.get(entry.get("intermediateregion") or "")
    return None


def _strings(value: Any) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def read_countries(data: Mapping[str, Mapping[str, Any]] | None = None) -> list[Country]:
    """The countries of `data` (default: the installed package's, `countryinfo_data`), sorted by
    alpha-3 code: one per ISO alpha-3 code (the entry with the most fields, then the first by
    name), `DISSOLVED` left out, named as `COMMON_NAMES` says, languages in English (`LANGUAGE_NAMES`:
    a code it lacks is skipped with a warning), no capital where the package gives several in one
    string ("Kralendijk / Oranjestad / The Bottom")."""
    data = countryinfo_data() if data is None else data
    chosen: dict[str, Mapping[str, Any]] = {}
    codes: dict[str, str] = {}  # alpha-2 or alpha-3 -> alpha-3, so a border given as alpha-2 resolves
    for key in sorted(data):
        entry = data[key]
        iso = entry.get("ISO") or {}
        alpha3 = iso.get("alpha3") if isinstance(iso, Mapping) else None
        if not isinstance(alpha3, str) or len(alpha3) != 3 or not entry.get("name") or alpha3 in DISSOLVED:
            continue
        for code in (iso.get("alpha2"), alpha3):
            if isinstance(code, str) and code:
                codes.setdefault(code.upper(), alpha3)
        if alpha3 not in chosen or len(entry) > len(chosen[alpha3]):
            chosen[alpha3] = entry
    countries = []
    for alpha3, entry in sorted(chosen.items()):
        languages: list[str] = []
        for code in _strings(entry.get("languages")):
            name = LANGUAGE_CORRECTIONS.get((alpha3, code), LANGUAGE_NAMES.get(code))
            if name is None:
                log.warning("countryinfo: %s: language code %r has no name in LANGUAGE_NAMES; skipped", alpha3, code)
            elif name not in languages:
                languages.append(name)
        borders = [codes[b.upper()] for b in _strings(entry.get("borders")) if b.upper() in codes]
        # "Kralendijk / Oranjestad / The Bottom" (Caribbean Netherlands): one capital per island, not the country's
        capitals = [capital for capital in _strings(entry.get("capital")) if " / " not in capital]
        population = entry.get("population")
        countries.append(Country(
            alpha3=alpha3,
            name=COMMON_NAMES.get(alpha3, entry["name"].strip()),
            continent=continent(entry),
            capitals=tuple(dict.fromkeys(c for c in capitals if c)),
            languages=tuple(languages),
            borders=tuple(dict.fromkeys(b for b in borders if b != alpha3 and b in chosen)),
            population=population if isinstance(population, int) else 0,
        ))
    names = [c.name for c in countries]
    if len(set(names)) != len(names):
        raise AssetError(f"countryinfo: two countries share a name: {sorted({n for n in names if names.count(n) > 1})}")
    return countries


def country_answers(countries: Sequence[Country]) -> dict[tuple[str, str], list[str]]:
    """(relation id, subject) -> answers, the true one first, for `COUNTRY_RELATIONS`."""
    by_code = {c.alpha3: c for c in countries}
    listed_by: dict[str, list[str]] = {c.alpha3: [] for c in countries}  # alpha-3 -> the countries listing it
    for country in countries:
        for border in country.borders:
            listed_by[border].append(country.alpha3)
    most_populous = lambda codes: sorted(codes, key=lambda code: (-by_code[code].population, by_code[code].name))  # noqa: E731
    answers: dict[tuple[str, str], list[str]] = {}
    for country in countries:
        if country.languages:
            answers[("P37", country.name)] = list(country.languages)
        own = most_populous(country.borders)
        others = most_populous(code for code in listed_by[country.alpha3] if code not in country.borders)
        if own:
            answers[("P47", country.name)] = [by_code[code].name for code in own + others]
        if country.capitals:
            answers[("P36", country.name)] = list(country.capitals)
        if country.continent:
            answers[("P30", country.name)] = [country.continent]
        for capital in country.capitals:
            holders = answers.setdefault(("P1376", capital), [])
            if country.name not in holders:
                holders.append(country.name)
    return answers


def country_facts_task(countries: Sequence[Country] | None = None) -> dict:
    """The facts as a qa_wikidata-style task, ``{"examples": [{"input": prompt, "target": answers}]}``,
    each input a `COUNTRY_RELATIONS` prompt with its subject (`qa_wikidata_records` reads it)."""
    countries = read_countries() if countries is None else countries
    prompts = {r.relation_id: r.prompt for r in COUNTRY_RELATIONS}
    return {"examples": [{"input": prompts[relation_id].format(subject), "target": targets}
                         for (relation_id, subject), targets in sorted(country_answers(countries).items())]}


def country_facts_records(
    *,
    seed: int = 0,
    max_neighbours: int = 10,
    min_neighbours: int = 1,
    countries: Sequence[Country] | None = None,
) -> list[dict]:
    """CounterFact-format records from the country facts (`country_facts_task`), built by
    `qa_wikidata_records` (the subject is never its own target_new) with ``"source": "countryinfo"``,
    in a seeded shuffle (`shuffled`)."""
    return _records(country_facts_task(countries), seed=seed, max_neighbours=max_neighbours,
                    min_neighbours=min_neighbours)


# The local lm-eval task prepare_data writes beside the records (downstream.tasks may name it).
UNEDITED_TASK = "country_facts_unedited"


def unedited_fact_questions(edited: Iterable[tuple[str, str]], *, seed: int = 0, n_choices: int = 4,
                            countries: Sequence[Country] | None = None) -> list[dict]:
    """Multiple-choice rows {"question", "choices", "answer", "relation"} for every country fact that
    no edit record holds: each (relation id, subject) of `country_facts_task` not in `edited`, asked
    with its relation's prompt ("The capital of France is"). The choices are the true answer and
    `n_choices` - 1 distinct answers of the same relation that are none of the subject's own answers
    nor the subject, drawn and shuffled by ``random.Random`` keyed on (seed, relation, subject).

    With the workflow's records (min_neighbours=1) this is mostly the capitals both ways (P36 and
    P1376, which have no neighbourhood prompts and so no records): facts of the model's own knowledge
    that sequential editing never targets, the real-model counterpart of the toy's toy_facts."""
    countries = read_countries() if countries is None else countries
    edited = set(edited)
    answers = country_answers(countries)
    pools: dict[str, dict[str, None]] = {}  # relation -> its answers, in order, once each
    for (relation_id, _), targets in sorted(answers.items()):
        pools.setdefault(relation_id, {}).update(dict.fromkeys(targets))
    prompts = {r.relation_id: r.prompt for r in COUNTRY_RELATIONS}
    rows = []
    for (relation_id, subject), targets in sorted(answers.items()):
        if (relation_id, subject) in edited:
            continue
        rng = random.Random(f"{seed}|unedited|{relation_id}|{subject}")
        others = [a for a in pools[relation_id] if a not in targets and a != subject]
        if len(others) < n_choices - 1:
            raise AssetError(f"countryinfo: relation {relation_id} has {len(others)} answers to draw "
                             f"{n_choices - 1} distractors from for {subject!r}")
        rows.append({**choice_row(rng, prompts[relation_id].format(subject), targets[0], others, n_choices),
                     "relation": relation_id})
    return rows


def shuffled(records: Sequence[dict], seed: int) -> list[dict]:
    """`records` in the order of ``random.Random(f"{seed}|order")``, case_id renumbered to match.

    `qa_wikidata_records` writes them relation by relation, and the workflow edits the first n of
    the prepared order: unshuffled, a run's first 128 edits would all be official-language facts."""
    order = list(records)
    random.Random(f"{seed}|order").shuffle(order)
    return [{**record, "case_id": index} for index, record in enumerate(order)]


def _records(task: dict, *, seed: int, max_neighbours: int, min_neighbours: int) -> list[dict]:
    return shuffled(qa_wikidata_records(task, seed=seed, max_neighbours=max_neighbours, min_neighbours=min_neighbours,
                                        relations=COUNTRY_RELATIONS, source=SOURCE, exclude_subject=True), seed)


def prepare_country_facts(
    out_path: str | Path,
    *,
    seed: int = 0,
    max_neighbours: int = 10,
    min_neighbours: int = 1,
) -> Path:
    """Write CounterFact-format records from the installed countryinfo package (a JSON list) to
    `out_path`, with a manifest beside it (editlib.data.fetch.manifest_path); returns `out_path`.

    The manifest's key covers the package version, the facts read from it and the parameters, so
    records are rebuilt when any changes. Load them with ``editlib.data.records.load_requests(out_path)``.
    """
    out_path = Path(out_path)
    task = country_facts_task()
    source = {"package": f"countryinfo=={countryinfo_version()}", "facts": content_key(task)}
    params = {"seed": seed, "max_neighbours": max_neighbours, "min_neighbours": min_neighbours,
              "relations": content_key([vars(r) for r in COUNTRY_RELATIONS]), "converter": 2}
    manifest = {"asset": "country_facts_counterfact",
                "key": content_key({"asset": "country_facts_counterfact", "source": source, "params": params}),
                "source": source, "params": params}
    if is_fresh(out_path, manifest_path(out_path), manifest):
        return out_path
    records = _records(task, seed=seed, max_neighbours=max_neighbours, min_neighbours=min_neighbours)
    if not records:
        raise AssetError(f"countryinfo ({source['package']}): no records could be built from it")
    write_json(out_path, records)
    write_json(manifest_path(out_path), {**manifest, "n_records": len(records)})
    return out_path
