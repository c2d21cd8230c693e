"""lm-eval tasks shaped like the paper configs' standard ones, with their data as hub datasets.

Three task groups, written to a task folder (lm-eval's include path) by `write_tasks`, whose
datasets live in the rehearsal's local hub (`write_task_datasets`) and are fetched by lm-eval's
own ``datasets.load_dataset(dataset_path, dataset_name)`` as the real tasks' are:

- ``rehearsal_mmlu``: a group of multiple-choice subtasks with an aggregate (acc weighted by
  size), test and dev splits, few-shot examples from dev (``first_n``), as lm-eval's ``mmlu``;
- ``rehearsal_bbh``: a group over a chain-of-thought generative task (``generate_until``) with its
  own ``num_fewshot: 3`` and inline few-shot samples and an answer-extracting filter, as ``bbh``
  (lm-eval's ``bbh_cot_fewshot_*``);
- ``rehearsal_mbpp``: a task flagged ``unsafe_code: true`` whose pass@1 executes the generated code,
  with ``num_fewshot: 3``, as ``mbpp``. Like lm-eval's mbpp (whose metric is `evaluate`'s
  code_eval, refusing to run unless ``HF_ALLOW_CODE_EVAL=1``), the metric module checks the
  guard when it is loaded and again before executing anything.

Generation lengths are shortened (``max_gen_toks`` 32); everything else follows lm-eval 0.4.13's
YAML for those tasks.
"""

from __future__ import annotations

import random
from pathlib import Path

import yaml

from editlib.io import write_text
from editlib.toy.world import World, fact_task_rows

from .standins import write_dataset_repo

OWNER = "editlib-rehearsal"
MMLU_SUBJECTS = ("people", "places")
TASKS = ("rehearsal_mmlu", "rehearsal_bbh", "rehearsal_mbpp")  # what the rehearsal's downstream.tasks name
SUBTASKS = {
    "rehearsal_mmlu": tuple(f"rehearsal_mmlu_{subject}" for subject in MMLU_SUBJECTS),
    "rehearsal_bbh": ("rehearsal_bbh_cot_fewshot_boolean_expressions",),
    "rehearsal_mbpp": (),
}
_LETTERS = ("A", "B", "C", "D")

MBPP_UTILS = '''"""pass@1 for rehearsal_mbpp: lm-eval's mbpp metric with a local executor instead of
`evaluate`'s code_eval (which the hub serves), behind the same HF_ALLOW_CODE_EVAL guard."""

import os
import subprocess
import sys

_WARNING = (
    "This metric executes untrusted model-generated code in Python. Set the environment variable "
    "HF_ALLOW_CODE_EVAL=\\"1\\" to allow it (as evaluate's code_eval requires)."
)


def _check_allowed():
    if os.getenv("HF_ALLOW_CODE_EVAL", "0") != "1":
        raise ValueError(_WARNING)


def _passes(program, timeout=5.0):
    try:
        done = subprocess.run([sys.executable, "-I", "-c", program], capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def pass_at_1(references, predictions):
    _check_allowed()
    if isinstance(references, str):
        references = [references]
    if isinstance(predictions[0], str):
        predictions = [[p] for p in predictions]
    results = [_passes(candidates[0] + "\\n" + test) for test, candidates in zip(references, predictions)]
    return sum(results) / len(results)


def list_fewshot_samples():
    return FEWSHOT


FEWSHOT = %(fewshot)r

# as lm-eval's mbpp utils: check at load time, before any generation, that code may run
pass_at_1(["assert add(2, 3) == 5"], [["def add(a, b):\\n    return a + b"]])
'''


def mmlu_rows(world: World, subject: str, n: int, rng: random.Random) -> list[dict]:
    rows = fact_task_rows(world)
    rng.shuffle(rows)
    out = []
    for row in rows:
        if len(row["choices"]) == 4 and len(out) < n:
            out.append({"question": row["question"].rstrip() + "?", "subject": subject, "choices": row["choices"],
                        "answer": row["answer"]})
    return out


def boolean_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        terms = [rng.choice(["True", "False"]) for _ in range(3)]
        ops = [rng.choice(["and", "or"]) for _ in range(2)]
        negate = rng.random() < 0.5
        expression = f"{'not ' if negate else ''}( {terms[0]} {ops[0]} {terms[1]} ) {ops[1]} {terms[2]}"
        rows.append({"input": f"{expression} is", "target": str(eval(expression))})  # noqa: S307 (our own literals)
    return rows


def mbpp_rows(n: int, start: int = 11) -> list[dict]:
    rows = []
    for index in range(n):
        k = index + 2
        rows.append({
            "task_id": start + index,
            "text": f"Write a function to multiply a number by {k}.",
            "code": f"def times_{k}(x):\n    return x * {k}",
            "test_list": [f"assert times_{k}({x}) == {x * k}" for x in (1, 2, 3)],
            "test_setup_code": "",
            "challenge_test_list": [],
        })
    return rows


MMLU_FEATURES = [{"name": "question", "dtype": "string"}, {"name": "subject", "dtype": "string"},
                 {"name": "choices", "sequence": "string"}, {"name": "answer", "dtype": "int64"}]
BBH_FEATURES = [{"name": "input", "dtype": "string"}, {"name": "target", "dtype": "string"}]
MBPP_FEATURES = [{"name": "task_id", "dtype": "int64"}, {"name": "text", "dtype": "string"},
                 {"name": "code", "dtype": "string"}, {"name": "test_list", "sequence": "string"},
                 {"name": "test_setup_code", "dtype": "string"}, {"name": "challenge_test_list", "sequence": "string"}]


def write_task_datasets(datasets_root: str | Path, world: World, n_items: int = 8, seed: int = 0) -> None:
    """The tasks' dataset repositories under `datasets_root` (<owner>/<name>/)."""
    root = Path(datasets_root) / OWNER
    rng = random.Random(f"rehearsal-tasks:{seed}")
    write_dataset_repo(root / "mmlu", {subject: {"test": mmlu_rows(world, subject, n_items, rng),
                                                 "dev": mmlu_rows(world, subject, 5, rng)}
                                       for subject in MMLU_SUBJECTS}, MMLU_FEATURES)
    write_dataset_repo(root / "bbh", {"boolean_expressions": {"test": boolean_rows(n_items, rng)}}, BBH_FEATURES)
    write_dataset_repo(root / "mbpp", {"full": {"test": mbpp_rows(n_items), "prompt": mbpp_rows(3, start=2)}},
                       MBPP_FEATURES)


def _dump(path: Path, config: dict) -> None:
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    write_text(path, text.replace("'!function ", "!function ").replace(".pass_at_1'", ".pass_at_1")
               .replace(".list_fewshot_samples'", ".list_fewshot_samples"))


def write_tasks(tasks_dir: str | Path) -> list[str]:
    """The task YAMLs (and the mbpp metric module) in `tasks_dir`; returns the configured names."""
    out = Path(tasks_dir)
    mmlu_template = {
        "dataset_path": f"{OWNER}/mmlu", "test_split": "test", "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"}, "output_type": "multiple_choice",
        "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                       "D. {{choices[3]}}\nAnswer:",
        "doc_to_choice": list(_LETTERS), "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    _dump(out / "_rehearsal_mmlu_template_yaml", mmlu_template)
    for subject, task in zip(MMLU_SUBJECTS, SUBTASKS["rehearsal_mmlu"], strict=True):
        _dump(out / f"{task}.yaml", {"dataset_name": subject, "include": "_rehearsal_mmlu_template_yaml", "task": task,
                                    "task_alias": subject,
                                    "description": f"The following are multiple choice questions about {subject}.\n\n"})
    _dump(out / "_rehearsal_mmlu.yaml", {"group": "rehearsal_mmlu", "task": list(SUBTASKS["rehearsal_mmlu"]),
                                         "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
                                         "metadata": {"version": 2}})
    rng = random.Random("rehearsal-bbh-fewshot")
    samples = [{"input": row["input"], "target": f"We evaluate the expression step by step. So the answer is {row['target']}."}
               for row in boolean_rows(3, rng)]
    [bbh_task] = SUBTASKS["rehearsal_bbh"]
    _dump(out / f"{bbh_task}.yaml", {
        "task": bbh_task, "dataset_path": f"{OWNER}/bbh", "dataset_name": "boolean_expressions",
        "output_type": "generate_until", "test_split": "test",
        "description": "Evaluate the result of a random Boolean expression.\n\n",
        "doc_to_text": "Q: {{input}}\nA: Let's think step by step.\n", "doc_to_target": "{{target}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "generation_kwargs": {"max_gen_toks": 32, "until": ["</s>", "Q", "\n\n"], "do_sample": False, "temperature": 0.0},
        "filter_list": [{"name": "get-answer", "filter": [
            {"function": "regex", "regex_pattern": "(?<=the answer is )(.*)(?=.)"}, {"function": "take_first"}]}],
        "num_fewshot": 3, "fewshot_config": {"sampler": "first_n", "samples": samples}, "metadata": {"version": 4.0},
    })
    _dump(out / "_rehearsal_bbh.yaml", {"group": "rehearsal_bbh", "task": [bbh_task], "aggregate_metric_list": [
        {"metric": "exact_match", "aggregation": "mean", "weight_by_size": True, "filter_list": "get-answer"}],
        "metadata": {"version": 3.0}})
    fewshot = [{**row, "is_fewshot": True} for row in mbpp_rows(3, start=2)]
    write_text(out / "rehearsal_mbpp_utils.py", MBPP_UTILS % {"fewshot": fewshot})
    _dump(out / "rehearsal_mbpp.yaml", {
        "task": "rehearsal_mbpp", "dataset_path": f"{OWNER}/mbpp", "dataset_name": "full", "unsafe_code": True,
        "output_type": "generate_until", "test_split": "test",
        "doc_to_text": "You are an expert Python programmer, and here is your task: {{text}} Your code should pass these "
                       "tests:\n\n{{test_list[0]}}\n{{test_list[1]}}\n{{test_list[2]}}\n[BEGIN]\n",
        "doc_to_target": "{% if is_fewshot is defined %}{{code}}\n[DONE]{% else %}{{test_list[0]}}\n{{test_list[1]}}\n"
                         "{{test_list[2]}}{% endif %}",
        "target_delimiter": "",
        "metric_list": [{"metric": "!function rehearsal_mbpp_utils.pass_at_1", "aggregation": "mean",
                         "higher_is_better": True}],
        "generation_kwargs": {"until": ["[DONE]"], "do_sample": False, "max_gen_toks": 32},
        "num_fewshot": 3,
        "fewshot_config": {"sampler": "first_n", "samples": "!function rehearsal_mbpp_utils.list_fewshot_samples"},
        "metadata": {"version": 1.0},
    })
    return list(TASKS)
