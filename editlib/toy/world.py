"""The toy fact world: a seeded, fictional knowledge base and every dataset derived from it.

The laptop-CPU default of the pipeline. Nothing is downloaded; everything follows from
`WorldConfig` (seed included), so the same config always writes byte-identical files.

- Subjects are invented people, companies and bands (names built from syllables); a fixed
  "backbone" of real countries and cities supplies shared objects and second hops.
- Each relation has an edit template ("The mother tongue of {} is"), 2-3 paraphrase templates
  and two ZsRE questions; every template ends right before the object. Objects are single words
  shared across subjects (5-12 per relation), so neighbourhood prompts exist.
- Subjects are split into an `edit` pool (the only subjects CounterFact / ZsRE records edit) and a
  `heldout` pool (neighbourhood prompts and downstream tasks), so edits and downstream facts are
  disjoint. Backbone entities are never edited.

`build_world(out_dir)` writes the training corpus, a separate wiki corpus (for second-moment
statistics), CounterFact and ZsRE records, two multiple-choice tasks and `world.json`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from editlib.data.records import ZSRE_LOC_PREFIX, parse_records
from editlib.data.downstream_tasks import choice_row
from editlib.io import content_key, write_json, write_jsonl, write_text

PERSON, COMPANY, BAND, CITY, COUNTRY = "person", "company", "band", "city", "country"
EDIT, HELDOUT, BACKBONE = "edit", "heldout", "backbone"
WORLD_FORMAT = 2  # bump when generation code changes what a config produces (part of world_key)

# country -> (capital, second city, official language)
GEOGRAPHY: dict[str, tuple[str, str, str]] = {
    "France": ("Paris", "Lyon", "French"),
    "Spain": ("Madrid", "Seville", "Spanish"),
    "Germany": ("Berlin", "Munich", "German"),
    "Italy": ("Rome", "Milan", "Italian"),
    "Japan": ("Tokyo", "Osaka", "Japanese"),
    "Canada": ("Ottawa", "Toronto", "English"),
}
COUNTRIES = tuple(GEOGRAPHY)
CITIES = tuple(city for capital, second, _ in GEOGRAPHY.values() for city in (capital, second))
LANGUAGES = ("French", "Spanish", "German", "Italian", "Japanese", "English", "Dutch", "Polish")


@dataclass(frozen=True)
class Relation:
    """A relation: who it applies to, its object vocabulary and its phrasings ("{}" = subject)."""

    relation_id: str
    name: str
    subject_kind: str
    objects: tuple[str, ...]
    template: str
    paraphrases: tuple[str, ...]
    question: str
    rephrase: str

    def statement(self, template: str, subject: str, obj: str) -> str:
        """A sentence stating the fact with `template`."""
        return f"{template.format(subject)} {obj}."


RELATIONS: tuple[Relation, ...] = (
    Relation("P27", "citizenship", PERSON, COUNTRIES, "{} is a citizen of",
             ("{} holds a passport from", "The nationality of {} is", "{} has the citizenship of"),
             "Which country is {} a citizen of?", "What is the nationality of {}?"),
    Relation("P103", "mother_tongue", PERSON, LANGUAGES, "The mother tongue of {} is",
             ("{} grew up speaking", "The first language of {} is", "{} natively speaks"),
             "What is the mother tongue of {}?", "Which language did {} grow up speaking?"),
    Relation("P106", "occupation", PERSON,
             ("doctor", "teacher", "pilot", "farmer", "lawyer", "baker", "nurse", "poet", "chef", "painter"),
             "{} works as a", ("{} earns a living as a", "By profession, {} is a", "{} is employed as a"),
             "What is the occupation of {}?", "What does {} do for a living?"),
    Relation("P1303", "instrument", PERSON,
             ("piano", "guitar", "violin", "drums", "flute", "cello", "harp", "trumpet"),
             "{} plays the", ("The instrument played by {} is the", "{} performs on the", "{} practises the"),
             "Which instrument does {} play?", "What instrument is {} known for playing?"),
    Relation("P641", "sport", PERSON,
             ("tennis", "football", "hockey", "cricket", "golf", "rugby", "baseball", "boxing"),
             "The favourite sport of {} is", ("{} competes in", "{} trains every day for", "On weekends {} plays"),
             "Which sport does {} play?", "What sport does {} compete in?"),
    Relation("P551", "residence", PERSON, CITIES, "{} lives in",
             ("{} resides in", "The home of {} is in", "{} has a house in"),
             "Which city does {} live in?", "Where does {} reside?"),
    Relation("P159", "headquarters", COMPANY, CITIES, "The headquarters of {} is in",
             ("{} is headquartered in", "The main office of {} is in", "{} has its head office in"),
             "Where is the headquarters of {}?", "In which city is {} headquartered?"),
    Relation("P452", "industry", COMPANY,
             ("software", "shipping", "mining", "banking", "textiles", "aviation", "farming", "retail"),
             "{} is a company in the field of", ("The industry of {} is", "{} does business in"),
             "Which industry does {} operate in?", "What field is {} active in?"),
    Relation("P495", "country_of_origin", COMPANY, COUNTRIES, "{} is a company from",
             ("{} originates from", "The home country of {} is", "{} was founded in the country of"),
             "Which country is {} from?", "What is the home country of {}?"),
    Relation("P1056", "product", COMPANY, ("cars", "phones", "shoes", "books", "toys", "games", "bikes", "tools"),
             "{} makes", ("The main product of {} is", "{} is known for its", "{} produces"),
             "What does {} make?", "What is the main product of {}?"),
    Relation("P136", "genre", BAND, ("jazz", "rock", "folk", "metal", "blues", "punk", "reggae", "soul"),
             "The genre of {} is", ("{} is a band that plays", "{} makes music in the style of"),
             "What genre of music does {} play?", "Which musical style is {} known for?"),
    Relation("P740", "formed_in", BAND, CITIES, "{} was formed in",
             ("{} was founded in the city of", "The band {} started out in"),
             "Where was {} formed?", "In which city did {} start out?"),
    Relation("P407", "song_language", BAND, LANGUAGES, "{} sings in",
             ("The songs of {} are written in", "The lyrics of {} are in"),
             "In which language does {} sing?", "What language are the songs of {} in?"),
    Relation("P870", "lead_instrument", BAND, ("piano", "guitar", "violin", "drums", "flute", "cello", "harp", "trumpet"),
             "The lead instrument of {} is the", ("{} is famous for its", "The sound of {} is built on the",
                                                  "{} always features the"),
             "Which instrument leads {}?", "What is the lead instrument of {}?"),
    Relation("P17", "located_in", CITY, COUNTRIES, "{} is located in",
             ("{} is a city in", "The country of {} is"),
             "Which country is {} located in?", "In which country is {}?"),
    Relation("P36", "capital", COUNTRY, tuple(capital for capital, _, _ in GEOGRAPHY.values()),
             "The capital of {} is", ("{} has its capital in", "The capital city of {} is"),
             "What is the capital of {}?", "Which city is the capital of {}?"),
    Relation("P37", "official_language", COUNTRY, tuple(dict.fromkeys(lang for _, _, lang in GEOGRAPHY.values())),
             "The official language of {} is", ("In {}, people mostly speak", "The main language of {} is"),
             "What is the official language of {}?", "Which language is spoken in {}?"),
)
RELATION_BY_ID: dict[str, Relation] = {relation.relation_id: relation for relation in RELATIONS}


@dataclass(frozen=True)
class Composition:
    """A two-hop question: object(second, object(first, subject)), asked with one template."""

    name: str
    first: str
    second: str
    template: str


COMPOSITIONS: tuple[Composition, ...] = (
    Composition("residence_country", "P551", "P17", "{} lives in a city located in"),
    Composition("citizenship_capital", "P27", "P36", "{} is a citizen of a country whose capital is"),
    Composition("headquarters_country", "P159", "P17", "{} has its headquarters in a city located in"),
    Composition("formed_in_country", "P740", "P17", "{} was formed in a city located in"),
)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o")
_CODAS = ("", "", "", "n", "r", "l", "s")
_COMPANY_SUFFIXES = ("Labs", "Works", "Group", "Systems", "Industries", "Holdings")
_BAND_NOUNS = ("Wolves", "Lanterns", "Ravens", "Echoes", "Comets", "Shadows", "Tigers", "Sparrows")
_FILLER = (
    "The weather in {city} was {weather} today.",
    "A new museum opened in {city} last year.",
    "The festival in {city} attracted many visitors.",
    "Tickets for the concert in {city} sold out quickly.",
    "The trains to {city} were {weather} and late.",
    "Travellers say that {country} is {weather} in spring.",
)
_WEATHER = ("mild", "cold", "warm", "rainy", "windy", "sunny", "quiet", "busy")
_GENERIC_GENERATION = {PERSON: "{} is", COMPANY: "{} is a company that", BAND: "{} is a band that"}


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a toy world (the seed included); sizes of every artefact."""

    seed: int = 0
    n_subjects: int = 300
    kind_weights: tuple[tuple[str, float], ...] = ((PERSON, 0.6), (COMPANY, 0.2), (BAND, 0.2))
    edit_fraction: float = 0.5
    facts_per_edit_subject: int = 2
    max_neighborhood: int = 10
    max_attribute: int = 10
    backbone_repeats: int = 4
    filler_fraction: float = 0.03
    compose_heldout_in_corpus: bool = False
    wiki_docs_per_subject: int = 2
    n_choices: int = 4
    name_scheme: str = "syllables"
    profiles_per_subject: int = 0
    questions_in_corpus: bool = False  # every fact also asked and answered (ZsRE's question forms)

    def __post_init__(self):
        if self.n_subjects < 10:
            raise ValueError(f"n_subjects must be >= 10, got {self.n_subjects}")
        if not 0.0 < self.edit_fraction < 1.0:
            raise ValueError(f"edit_fraction must be in (0, 1), got {self.edit_fraction}")
        if self.name_scheme not in ("syllables", "single"):
            raise ValueError(f"name_scheme must be 'syllables' or 'single', got {self.name_scheme!r}")
        if not 2 <= self.n_choices <= 6:
            raise ValueError(f"n_choices must be in [2, 6] (the smallest object vocabulary), got {self.n_choices}")

    def rng(self, purpose: str) -> random.Random:
        """An independent generator per artefact, so changing one artefact never shifts another."""
        return random.Random(f"toyworld:{self.seed}:{purpose}")


@dataclass(frozen=True)
class Fact:
    subject: str
    relation_id: str
    object: str


@dataclass
class World:
    """The knowledge base: entities by name (kind, split) and all true facts."""

    config: WorldConfig
    kinds: dict[str, str]
    splits: dict[str, str]
    facts: list[Fact]
    _index: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._index = {(fact.subject, fact.relation_id): fact.object for fact in self.facts}

    def object_of(self, subject: str, relation_id: str) -> str | None:
        return self._index.get((subject, relation_id))

    def subjects(self, split: str) -> list[str]:
        """Subjects of one split, in creation order."""
        return [name for name, s in self.splits.items() if s == split]

    def facts_of(self, subject: str) -> list[Fact]:
        return [fact for fact in self.facts if fact.subject == subject]

    def compose(self, composition: Composition, subject: str) -> str | None:
        """The two-hop answer for `subject`, or None if the first hop does not apply."""
        bridge = self.object_of(subject, composition.first)
        return None if bridge is None else self.object_of(bridge, composition.second)


# --------------------------------------------------------------------------- knowledge base


def _word(rng: random.Random, syllables: int) -> str:
    """A pronounceable invented word: CV syllables with an optional final consonant."""
    body = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return (body + rng.choice(_CODAS)).capitalize()


def _subject_name(rng: random.Random, kind: str, scheme: str) -> str:
    """An invented name: one word ("single"), or two words, the second a shared company suffix or
    band noun for companies and bands ("syllables")."""
    if scheme == "single":
        return _word(rng, rng.choice((2, 3)))
    if kind == PERSON:
        return f"{_word(rng, 2)} {_word(rng, rng.choice((2, 3)))}"
    if kind == COMPANY:
        return f"{_word(rng, rng.choice((2, 3)))} {rng.choice(_COMPANY_SUFFIXES)}"
    return f"{_word(rng, 2)} {rng.choice(_BAND_NOUNS)}"


def _subject_kinds(config: WorldConfig, rng: random.Random) -> list[str]:
    """Kinds of the n subjects in proportion to `kind_weights` (largest remainder), shuffled."""
    total = sum(weight for _, weight in config.kind_weights)
    shares = [(kind, config.n_subjects * weight / total) for kind, weight in config.kind_weights]
    counts = {kind: int(share) for kind, share in shares}
    by_remainder = sorted(shares, key=lambda item: -(item[1] - int(item[1])))
    for kind, _ in by_remainder[: config.n_subjects - sum(counts.values())]:
        counts[kind] += 1
    kinds = [kind for kind, _ in config.kind_weights for _ in range(counts[kind])]
    rng.shuffle(kinds)
    return kinds


def _backbone_facts() -> list[Fact]:
    facts = []
    for country, (capital, second, language) in GEOGRAPHY.items():
        facts += [Fact(country, "P36", capital), Fact(country, "P37", language)]
        facts += [Fact(capital, "P17", country), Fact(second, "P17", country)]
    return facts


def make_world(config: WorldConfig) -> World:
    """Invent the subjects, split them into edit / held-out pools and draw their facts."""
    rng = config.rng("kb")
    reserved = set(COUNTRIES) | set(CITIES) | set(LANGUAGES)
    kinds: dict[str, str] = {name: COUNTRY for name in COUNTRIES} | {name: CITY for name in CITIES}
    splits: dict[str, str] = dict.fromkeys(kinds, BACKBONE)
    subject_kinds = _subject_kinds(config, rng)
    n_edit = round(config.n_subjects * config.edit_fraction)
    facts = _backbone_facts()
    for position, kind in enumerate(subject_kinds):
        name = _subject_name(rng, kind, config.name_scheme)
        while name in kinds or name.split()[0] in reserved:
            name = _subject_name(rng, kind, config.name_scheme)
        kinds[name] = kind
        splits[name] = EDIT if position < n_edit else HELDOUT
        facts += [Fact(name, r.relation_id, rng.choice(r.objects)) for r in RELATIONS if r.subject_kind == kind]
    return World(config, kinds, splits, facts)


# --------------------------------------------------------------------------- corpora


def _fact_sentences(fact: Fact) -> list[str]:
    """The fact stated once with every template of its relation."""
    relation = RELATION_BY_ID[fact.relation_id]
    return [relation.statement(t, fact.subject, fact.object) for t in (relation.template, *relation.paraphrases)]


def _questions(fact: Fact) -> list[str]:
    """The fact asked with its relation's two ZsRE questions."""
    relation = RELATION_BY_ID[fact.relation_id]
    return [question.format(fact.subject) for question in (relation.question, relation.rephrase)]


def _question_sentences(fact: Fact) -> list[str]:
    """The fact asked with its relation's two ZsRE questions, each followed by the answer."""
    return [f"{question} {fact.object}." for question in _questions(fact)]


def _filler_sentence(rng: random.Random) -> str:
    template = rng.choice(_FILLER)
    return template.format(city=rng.choice(CITIES), country=rng.choice(COUNTRIES), weather=rng.choice(_WEATHER))


def compose_question(world: World, composition: Composition, subject: str) -> tuple[str, str] | None:
    """A two-hop question with its first hop stated in context, and its answer; None if the
    composition does not apply to `subject`.

    E.g. ("Rivol Thoste lives in Lyon. Rivol Thoste lives in a city located in", "France"): the
    model must read the bridge entity from context and recall the backbone fact about it.
    """
    bridge = world.object_of(subject, composition.first)
    if bridge is None:
        return None
    first = RELATION_BY_ID[composition.first]
    context = first.statement(first.template, subject, bridge)
    return f"{context} {composition.template.format(subject)}", world.compose(composition, subject)


def _composition_sentences(world: World, splits: Sequence[str]) -> list[str]:
    sentences = []
    for subject, split in world.splits.items():
        if split not in splits:
            continue
        for composition in COMPOSITIONS:
            question = compose_question(world, composition, subject)
            if question is not None:
                sentences.append(f"{question[0]} {question[1]}.")
    return sentences


def profile_lines(world: World, rng: random.Random) -> list[str]:
    """`profiles_per_subject` lines per invented subject: its name directly followed by all its
    objects in a random order ("Rivol Thoste Lyon piano French ..."). The token after the name is
    an attribute of unknown relation, so the model must recall the subject's attributes at the
    subject's last token."""
    lines = []
    for subject, split in world.splits.items():
        if split == BACKBONE:
            continue
        objects = [fact.object for fact in world.facts_of(subject)]
        for _ in range(world.config.profiles_per_subject):
            lines.append(f"{subject} {' '.join(rng.sample(objects, len(objects)))}.")
    return lines


def training_corpus(world: World) -> list[str]:
    """Every fact in all its templates (backbone facts repeated), with `questions_in_corpus` also
    asked and answered in its two ZsRE question forms, two-hop statements, and filler.

    Two-hop statements (`compose_question` + answer) cover the edit pool, plus the held-out pool
    only with `compose_heldout_in_corpus`; by default toy_compose's questions are never seen in
    training, so answering them takes the learnt skill (read the bridge, recall its backbone fact).
    Returned shuffled (seeded), one sentence per line.
    """
    config = world.config
    rng = config.rng("corpus")
    sentences = []
    for fact in world.facts:
        repeats = config.backbone_repeats if world.splits[fact.subject] == BACKBONE else 1
        sentences += _fact_sentences(fact) * repeats
        if config.questions_in_corpus:
            sentences += _question_sentences(fact) * repeats
    compose_splits = (EDIT, HELDOUT) if config.compose_heldout_in_corpus else (EDIT,)
    sentences += _composition_sentences(world, compose_splits)
    sentences += profile_lines(world, rng)
    sentences += [_filler_sentence(rng) for _ in range(round(config.filler_fraction * len(sentences)))]
    rng.shuffle(sentences)
    return sentences


def dialogue_corpus(world: World) -> list[str]:
    """Question-answer dialogues about every fact of the world, in both of its relation's ZsRE
    question forms ("Question: Where is X located? Answer: Y."), shuffled (seeded): the data of
    the toy "chat" variant's further training (editlib.toy.pretrain.TrainConfig.dialogue_steps)."""
    lines = [f"Question: {question} Answer: {fact.object}." for fact in world.facts for question in _questions(fact)]
    world.config.rng("dialogues").shuffle(lines)
    return lines


def wiki_documents(world: World) -> list[dict]:
    """Short encyclopedic documents, a few sentences each, for second-moment statistics.

    Each document states all facts of one entity, each with a randomly chosen template, plus a
    filler sentence; `wiki_docs_per_subject` documents per entity (different template draws).
    """
    rng = world.config.rng("wiki")
    documents = []
    for subject in world.kinds:
        for _ in range(world.config.wiki_docs_per_subject):
            sentences = [rng.choice(_fact_sentences(fact)) for fact in world.facts_of(subject)]
            rng.shuffle(sentences)
            sentences.append(_filler_sentence(rng))
            documents.append({"text": " ".join(sentences)})
    rng.shuffle(documents)
    return documents


# --------------------------------------------------------------------------- edit records


def edit_facts(world: World) -> list[Fact]:
    """The facts that records edit: `facts_per_edit_subject` per edit-pool subject.

    Ordered in rounds (every subject's first fact, then every subject's second, ...), so any
    prefix of the list shorter than the edit pool has unique subjects.
    """
    rng = world.config.rng("edit-facts")
    subjects = world.subjects(EDIT)
    rng.shuffle(subjects)
    chosen = {subject: rng.sample(world.facts_of(subject), len(world.facts_of(subject))) for subject in subjects}
    rounds = min(world.config.facts_per_edit_subject, min(len(facts) for facts in chosen.values()))
    return [chosen[subject][index] for index in range(rounds) for subject in subjects]


def _heldout_with(world: World, relation_id: str, obj: str) -> list[str]:
    """Held-out subjects whose `relation_id` object is `obj`, in creation order."""
    return [s for s in world.subjects(HELDOUT) if world.object_of(s, relation_id) == obj]


def counterfact_records(world: World) -> list[dict]:
    """CounterFact-format records, one per edit fact, with a seeded counterfactual target."""
    rng = world.config.rng("counterfact")
    records = []
    for case_id, fact in enumerate(edit_facts(world)):
        relation = RELATION_BY_ID[fact.relation_id]
        target_new = rng.choice([o for o in relation.objects if o != fact.object])
        neighbours = _heldout_with(world, relation.relation_id, fact.object)
        attributes = _heldout_with(world, relation.relation_id, target_new)
        neighbours = rng.sample(neighbours, min(world.config.max_neighborhood, len(neighbours)))
        attributes = rng.sample(attributes, min(world.config.max_attribute, len(attributes)))
        paraphrases = rng.sample(relation.paraphrases, len(relation.paraphrases))
        generation = [paraphrases[-1], _GENERIC_GENERATION[relation.subject_kind], "Everyone knows that {}"]
        records.append({
            "case_id": case_id,
            "requested_rewrite": {
                "prompt": relation.template,
                "subject": fact.subject,
                "relation_id": relation.relation_id,
                "target_new": {"str": target_new},
                "target_true": {"str": fact.object},
            },
            "paraphrase_prompts": [t.format(fact.subject) for t in paraphrases[:2]],
            "neighborhood_prompts": [relation.template.format(s) for s in neighbours],
            "attribute_prompts": [relation.template.format(s) for s in attributes],
            "generation_prompts": [t.format(fact.subject) for t in generation],
        })
    return records


def zsre_records(world: World, counterfact: Sequence[dict]) -> list[dict]:
    """ZsRE (MEND-eval) records for the same edit facts: questions, with `alt` = the CounterFact
    target_new and `loc` a question about a random held-out fact."""
    rng = world.config.rng("zsre")
    heldout = [fact for fact in world.facts if world.splits[fact.subject] == HELDOUT]
    records = []
    for record in counterfact:
        rewrite = record["requested_rewrite"]
        relation = RELATION_BY_ID[rewrite["relation_id"]]
        subject, true, alt = rewrite["subject"], rewrite["target_true"]["str"], rewrite["target_new"]["str"]
        loc_fact = rng.choice(heldout)
        loc_question = RELATION_BY_ID[loc_fact.relation_id].question.format(loc_fact.subject).rstrip("?")
        src = relation.question.format(subject)
        records.append({
            "subject": subject,
            "src": src,
            "pred": true,
            "rephrase": relation.rephrase.format(subject),
            "alt": alt,
            "answers": [true],
            "loc": ZSRE_LOC_PREFIX + loc_question,
            "loc_ans": loc_fact.object,
            "cond": f"{true} >> {alt} || {src}",
        })
    return records


# --------------------------------------------------------------------------- downstream tasks


def fact_task_rows(world: World) -> list[dict]:
    """toy_facts: one question per fact of a held-out subject (never edited), edit template."""
    rng = world.config.rng("task-facts")
    rows = []
    for fact in world.facts:
        if world.splits[fact.subject] == HELDOUT:
            relation = RELATION_BY_ID[fact.relation_id]
            question = relation.template.format(fact.subject)
            rows.append(choice_row(rng, question, fact.object, relation.objects, world.config.n_choices))
    return rows


def compose_task_rows(world: World) -> list[dict]:
    """toy_compose: two-hop questions about held-out subjects, the first hop (a held-out fact)
    stated in context and the second hop a backbone fact (see `compose_question`)."""
    rng = world.config.rng("task-compose")
    rows = []
    for subject in world.subjects(HELDOUT):
        for composition in COMPOSITIONS:
            question = compose_question(world, composition, subject)
            if question is not None:
                pool = RELATION_BY_ID[composition.second].objects
                rows.append(choice_row(rng, question[0], question[1], pool, world.config.n_choices))
    return rows


# --------------------------------------------------------------------------- world.json and build


def world_description(world: World) -> dict:
    """The JSON description of the knowledge base (world.json)."""
    return {
        "config": asdict(world.config),
        "world_key": content_key({"format": WORLD_FORMAT, **asdict(world.config)}),
        "relations": [asdict(relation) for relation in RELATIONS],
        "compositions": [asdict(composition) for composition in COMPOSITIONS],
        "entities": [{"name": name, "kind": world.kinds[name], "split": world.splits[name]} for name in world.kinds],
        "facts": [asdict(fact) for fact in world.facts],
    }


def load_world(world_dir: str | Path) -> World:
    """Rebuild a World from world_dir/world.json."""
    description = json.loads((Path(world_dir) / "world.json").read_text(encoding="utf-8"))
    raw = description["config"]
    config = WorldConfig(**{**raw, "kind_weights": tuple(tuple(pair) for pair in raw["kind_weights"])})
    kinds = {entity["name"]: entity["kind"] for entity in description["entities"]}
    splits = {entity["name"]: entity["split"] for entity in description["entities"]}
    return World(config, kinds, splits, [Fact(**fact) for fact in description["facts"]])


def build_world(out_dir: str | Path, config: WorldConfig | None = None, **overrides) -> dict:
    """Write the toy world under `out_dir` and return a summary (counts and paths).

    `overrides` replace fields of `config` (default WorldConfig()), e.g.
    `build_world(out, seed=1, n_subjects=40)`. Files (all written atomically):
    train_corpus.txt, wiki.jsonl, counterfact.json, zsre.json, tasks/toy_facts.jsonl,
    tasks/toy_compose.jsonl, world.json (written last).
    """
    config = replace(config or WorldConfig(), **overrides)
    out_dir = Path(out_dir)
    world = make_world(config)
    corpus = training_corpus(world)
    wiki = wiki_documents(world)
    counterfact = counterfact_records(world)
    zsre = zsre_records(world, counterfact)
    parse_records(counterfact, kind="counterfact")
    parse_records(zsre, kind="zsre")
    facts_rows, compose_rows = fact_task_rows(world), compose_task_rows(world)
    write_text(out_dir / "train_corpus.txt", "\n".join(corpus) + "\n")
    write_jsonl(out_dir / "wiki.jsonl", wiki)
    write_json(out_dir / "counterfact.json", counterfact)
    write_json(out_dir / "zsre.json", zsre)
    write_jsonl(out_dir / "tasks" / "toy_facts.jsonl", facts_rows)
    write_jsonl(out_dir / "tasks" / "toy_compose.jsonl", compose_rows)
    description = world_description(world)
    write_json(out_dir / "world.json", description)
    return {
        "out_dir": str(out_dir),
        "world_key": description["world_key"],
        "n_entities": len(world.kinds),
        "n_edit_subjects": len(world.subjects(EDIT)),
        "n_heldout_subjects": len(world.subjects(HELDOUT)),
        "n_facts": len(world.facts),
        "n_train_sentences": len(corpus),
        "n_wiki_documents": len(wiki),
        "n_counterfact": len(counterfact),
        "n_zsre": len(zsre),
        "n_toy_facts": len(facts_rows),
        "n_toy_compose": len(compose_rows),
    }
