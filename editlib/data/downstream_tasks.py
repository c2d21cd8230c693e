"""lm-eval task files this project writes, each a local jsonl file plus a task YAML that
``TaskManager(include_path=..., include_defaults=False)`` indexes with no hub access:
multiple-choice tasks (rows ``{"question", "choices", "answer"}``, `write_mc_task`), perplexity
tasks (rows ``{"text"}``, `write_perplexity_task`), and the glue_eval benchmark files used by
UME / AlphaEdit converted to the multiple-choice form with their prompts (`glue_eval_items`,
`write_glue_eval_task`)."""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from editlib.io import write_jsonl, write_text

log = logging.getLogger(__name__)

MC_METRICS = ("acc", "acc_norm")
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------------------- local MC tasks


def choice_row(rng: random.Random, question: str, answer: str, pool: Sequence[str], n_choices: int) -> dict:
    """A multiple-choice row {"question", "choices", "answer"}: the answer plus `n_choices` - 1
    distinct distractors drawn from `pool` (the answer left out), shuffled by `rng`."""
    distractors = rng.sample([o for o in pool if o != answer], n_choices - 1)
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(answer)}


def read_mc_items(jsonl_path: str | Path) -> list[dict]:
    """Read and validate multiple-choice rows {"question", "choices", "answer"}."""
    rows = []
    with open(jsonl_path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            where = f"{jsonl_path}:{line_no}"
            if not isinstance(row.get("question"), str):
                raise ValueError(f"{where}: 'question' must be a string")
            choices = row.get("choices")
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                raise ValueError(f"{where}: 'choices' must be a list of >= 2 non-empty strings")
            answer = row.get("answer")
            if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
                raise ValueError(f"{where}: 'answer' must be an int index into choices, got {answer!r}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{jsonl_path}: no items")
    return rows


def write_mc_task(
    name: str,
    jsonl_path: str | Path,
    out_dir: str | Path,
    *,
    fewshot_jsonl_path: str | Path | None = None,
    fewshot_sampler: str = "default",
    target_delimiter: str = " ",
    fewshot_delimiter: str = "\n\n",
    description: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Write ``out_dir/<name>.yaml``, an lm-eval multiple-choice task over a local MC jsonl file.

    The continuation scored for choice c is ``target_delimiter + c``: store choices without a
    leading space ("A", "positive") and keep the default " " delimiter.
    Data files are recorded as absolute paths (lm-eval hands ``dataset_kwargs`` to
    ``datasets.load_dataset("json", ...)``, which would resolve a relative path against the
    working directory of the evaluating process, not against the YAML).
    ``cache_dir`` is where `datasets` writes its Arrow copy of the file; it defaults to
    ``out_dir/.hf_datasets_cache`` so that nothing lands in ``~/.cache/huggingface``.
    Few-shot examples come from ``fewshot_jsonl_path`` when given, else from the test items
    themselves (lm-eval then excludes the item being evaluated); ``fewshot_sampler`` is "default"
    (seeded random draw) or "first_n" (the first k in file order, as UME does).
    The YAML sets no ``num_fewshot``: `evaluate_downstream(num_fewshot=k)` sets it, and without
    one (None) lm-eval evaluates the task zero-shot.
    """
    if fewshot_sampler not in ("default", "first_n"):
        raise ValueError(f"fewshot_sampler must be 'default' or 'first_n', got {fewshot_sampler!r}")
    data_files = {"test": str(Path(jsonl_path).resolve())}
    read_mc_items(data_files["test"])
    if fewshot_jsonl_path is not None:
        data_files["fewshot"] = str(Path(fewshot_jsonl_path).resolve())
        read_mc_items(data_files["fewshot"])
    body: dict[str, Any] = {
        "fewshot_split": "fewshot" if fewshot_jsonl_path is not None else "test",
        "fewshot_config": {"sampler": fewshot_sampler},
        "output_type": "multiple_choice",
        # Plain feature names: lm-eval returns doc[field] as is (no Jinja rendering, which
        # would need escaping of braces in questions).
        "doc_to_text": "question",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": target_delimiter,
        "fewshot_delimiter": fewshot_delimiter,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in MC_METRICS],
    }
    if description is not None:
        body["description"] = description
    return _write_local_task(name, out_dir, data_files, cache_dir, body)


def _write_local_task(name: str, out_dir: str | Path, data_files: dict[str, str], cache_dir: str | Path | None,
                      body: dict[str, Any]) -> Path:
    """``out_dir/<name>.yaml``: the task `name` over local jsonl `data_files` (absolute paths; split
    "test" evaluated), `datasets`' Arrow copy in `cache_dir` (default ``out_dir/.hf_datasets_cache``),
    and the task's own fields `body`."""
    if not _TASK_NAME.match(name):
        raise ValueError(f"task name {name!r} must match {_TASK_NAME.pattern}")
    out_dir = Path(out_dir).resolve()
    cache_dir = Path(cache_dir).resolve() if cache_dir is not None else out_dir / ".hf_datasets_cache"
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": data_files, "cache_dir": str(cache_dir)},
              "test_split": "test", **body, "metadata": {"version": 1.0}}
    path = out_dir / f"{name}.yaml"
    write_text(path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def write_perplexity_task(name: str, jsonl_path: str | Path, out_dir: str | Path, *,
                          cache_dir: str | Path | None = None) -> Path:
    """Write ``out_dir/<name>.yaml``, an lm-eval loglikelihood_rolling task over the texts of a local
    jsonl file (rows ``{"text"}``), scored as lm-eval scores wikitext: word_perplexity,
    byte_perplexity and bits_per_byte over all texts (lower is better; lm-eval reports no standard
    error for them, editlib.eval.downstream.ratio_metric_stderr computes it). Paths as in `write_mc_task`.
    As lm-eval 0.4.13 scores any such task: a text's tokens are scored after lm-eval's prefix token
    (BOS), and a tokenizer that prepends BOS itself has that BOS scored too, once per text."""
    test = Path(jsonl_path).resolve()
    with open(test, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if line.strip() and not (isinstance(text := json.loads(line).get("text"), str) and text.strip()):
                raise ValueError(f"{test}:{line_no}: 'text' must be a non-empty string")
    body = {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                        {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                        {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}],
    }
    return _write_local_task(name, out_dir, {"test": str(test)}, cache_dir, body)


# ---------------------------------------------------------------------------- glue_eval converters
# Prompts follow UME / AlphaEdit `glue_eval/*_eval.py`: the context ends right before the
# label word and the label word is scored with a leading space (target_delimiter " ").

_LETTERS = ("A", "B", "C", "D")


def _mmlu_item(row: dict) -> dict:
    options = "".join(f"({letter}) {choice}\n" for letter, choice in zip(_LETTERS, row["choices"], strict=True))
    question = f"Question: {row['question']}\n{options}Answer:"
    return {"question": question, "choices": list(_LETTERS), "answer": int(row["answer"])}


def _sst2_item(row: dict) -> dict:
    # label 1 positive / 0 negative
    question = f"Review : {row['sentence'].strip()}\nSentiment :"
    return {"question": question, "choices": ["negative", "positive"], "answer": int(row["label"])}


def _mrpc_item(row: dict) -> dict:
    # label 1 paraphrase
    question = (
        "Are the sentences paraphrases of each other.\n"
        f"Sentence 1: {row['sentence1'].strip()}\nSentence 2: {row['sentence2'].strip()}\nAnswer:"
    )
    return {"question": question, "choices": ["No", "Yes"], "answer": int(row["label"])}


def _cola_item(row: dict) -> dict:
    # label 1 acceptable
    question = f"Is this sentence linguistically acceptable?\nSentence: {row['sentence'].strip()}\nAnswer:"
    return {"question": question, "choices": ["No", "Yes"], "answer": int(row["label"])}


def _rte_item(row: dict) -> dict:
    # GLUE RTE: label 0 = entailment, 1 = not_entailment. UME's rte_eval.py scores label 1 as "True",
    # i.e. with the labels inverted; here "True" is the entailment answer.
    question = f"{row['sentence1'].strip()}\nquestion: {row['sentence2'].strip()} True or False?\nanswer:"
    return {"question": question, "choices": ["True", "False"], "answer": int(row["label"])}


def _nli_item(row: dict) -> dict:
    question = f"{row['sentence1'].strip()} entails the {row['sentence2'].strip()} True or False? Answer:"
    return {"question": question, "choices": ["True", "False"], "answer": 0 if row["label"] == "entailment" else 1}


def _sentiment_analysis_item(row: dict) -> dict:
    # label "1" positive / "0" negative
    question = (
        "For each snippet of text,label the sentiment of the text as positive or negative."
        "The answer should be exact 'positive' or 'negative'. "
        f"text: {row['sentence'].strip()} answer:"
    )
    return {"question": question, "choices": ["negative", "positive"], "answer": int(row["label"])}


def _dialogue_item(row: dict) -> dict:
    options = "".join(f"({letter}){option}\n" for letter, option in zip(_LETTERS, row["options"], strict=True))
    question = f"Q: Given the following: {row['article']}\nWhich choice is correct?\n{options}Answer:"
    return {"question": question, "choices": list(_LETTERS), "answer": _LETTERS.index(row["answers"])}


GLUE_EVAL_CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "mmlu": _mmlu_item,
    "sst2": _sst2_item,
    "mrpc": _mrpc_item,
    "cola": _cola_item,
    "rte": _rte_item,
    "nli": _nli_item,
    "sentiment_analysis": _sentiment_analysis_item,
    "dialogue": _dialogue_item,
}
# UME separates few-shot examples with "\n" (dialogue: a blank line).
GLUE_EVAL_FEWSHOT_DELIMITER = {task: "\n" for task in GLUE_EVAL_CONVERTERS} | {"dialogue": "\n\n"}
GLUE_EVAL_FEWSHOT_POOL = 10  # UME: the first 10 items are the few-shot pool, the rest are evaluated


def _glue_eval_source(task: str, source: str | Path) -> Path:
    source = Path(source)
    return source / f"{task}.jsonl" if source.is_dir() else source


def glue_eval_items(task: str, source: str | Path) -> list[dict]:
    """Convert a glue_eval benchmark file (``source``: the jsonl file, or the glue_eval folder)
    to multiple-choice rows, in file order."""
    if task not in GLUE_EVAL_CONVERTERS:
        raise ValueError(f"unknown glue_eval task {task!r}; known: {sorted(GLUE_EVAL_CONVERTERS)}")
    convert = GLUE_EVAL_CONVERTERS[task]
    with open(_glue_eval_source(task, source), encoding="utf-8") as handle:
        return [convert(json.loads(line)) for line in handle if line.strip()]


def write_glue_eval_task(
    task: str,
    source: str | Path,
    out_dir: str | Path,
    *,
    name: str | None = None,
    n_fewshot_pool: int = GLUE_EVAL_FEWSHOT_POOL,
    cache_dir: str | Path | None = None,
) -> Path:
    """Convert one glue_eval file and write ``<name>.jsonl``, ``<name>_fewshot.jsonl`` and the task
    YAML into ``out_dir``; return the YAML path. ``name`` defaults to ``glue_eval_<task>``.

    As in UME, the first ``n_fewshot_pool`` items are the few-shot pool (taken in order,
    sampler "first_n") and the remaining items are evaluated, so ``limit=100`` scores the same
    100 items as UME's ``number_of_tests=100``.
    """
    name = name or f"glue_eval_{task}"
    items = glue_eval_items(task, source)
    if not 0 < n_fewshot_pool < len(items):
        raise ValueError(f"n_fewshot_pool must be in (0, {len(items)}), got {n_fewshot_pool}")
    out_dir = Path(out_dir)
    test_path, fewshot_path = out_dir / f"{name}.jsonl", out_dir / f"{name}_fewshot.jsonl"
    write_jsonl(fewshot_path, items[:n_fewshot_pool])
    write_jsonl(test_path, items[n_fewshot_pool:])
    return write_mc_task(
        name,
        test_path,
        out_dir,
        fewshot_jsonl_path=fewshot_path,
        fewshot_sampler="first_n",
        fewshot_delimiter=GLUE_EVAL_FEWSHOT_DELIMITER[task],
        cache_dir=cache_dir,
    )
