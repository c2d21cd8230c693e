"""Downstream change after sequential editing, paired question by question and text by text.

The findings compare a run's downstream value before editing with the value after its last edits
as two independent measurements (the half-width of the difference is the hypotenuse of the two
standard errors). Both are measured on the same questions and texts, so most of that noise is
shared: this script scores the unedited model and each sequential run's last saved state on the
configured tasks again, keeps lm-eval's per-item results, and gives each difference with the
interval of its per-item differences beside the independent one:

- multiple-choice accuracy: the mean of (correct after - correct before) over questions, 95%
  interval 1.96 standard errors of that mean;
- perplexity tasks (loglikelihood_rolling): the relative change of word perplexity,
  exp(-sum(ll_after - ll_before) / sum(words)) - 1, its interval from the delta-method standard
  error of that ratio over texts (editlib.eval.downstream.ratio_stderr).

Run from the repository root after `make reproduce CONFIG=<config>` (it reads the run's prepared
model, data and the sequential jobs' saved states):

    python analyses/paired_downstream.py --config configs/smollm2-erosion.yaml
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editlib.editing.statistics import load_moments  # noqa: E402
from editlib.eval.downstream import item_rows, lm_eval_results, ratio_stderr  # noqa: E402
from editlib.io import load_tensors  # noqa: E402
from editlib.study.experiments import ExperimentContext, saved_states, state_labels  # noqa: E402
from editlib.study.pipeline import downstream_arguments, edit_spec, load_configured_model  # noqa: E402
from editlib.study.plan import load_config  # noqa: E402
from editlib.study.stages import model_config, stage_config  # noqa: E402

Z95 = 1.96
PERPLEXITY_METRIC = "word_perplexity"


def per_item(model, tokenizer, arguments: dict, tasks: list[str]) -> dict[str, dict[int, tuple]]:
    """{task: {doc_id: (correct,) for a multiple-choice task, (log-likelihood, words) for a
    perplexity task}}, from lm-eval's logged samples, one lm-eval call per task."""
    items = {}
    for task in tasks:
        results = lm_eval_results(model, tokenizer, [task], log_samples=True, **arguments)
        for name, samples in results["samples"].items():
            if samples and PERPLEXITY_METRIC in samples[0]:
                items[name] = {s["doc_id"]: tuple(float(v) for v in s[PERPLEXITY_METRIC]) for s in samples}
            else:
                items[name] = {row["doc_id"]: (float(row["correct"]),) for row in item_rows({"samples": {name: samples}})}
    return items


def compare(before: dict[int, tuple], after: dict[int, tuple]) -> dict:
    """The change from `before` to `after` on one task, paired and as if independent."""
    ids = sorted(before)
    if after.keys() != before.keys():
        raise ValueError("the two evaluations scored different items")
    a, b = np.array([before[i] for i in ids]), np.array([after[i] for i in ids])
    n = len(ids)
    if a.shape[1] == 1:  # accuracy
        diff = b[:, 0] - a[:, 0]
        paired = Z95 * diff.std(ddof=1) / math.sqrt(n)
        independent = Z95 * math.hypot(a[:, 0].std(ddof=1), b[:, 0].std(ddof=1)) / math.sqrt(n)
        change = float(diff.mean())
        return {"kind": "accuracy", "before": float(a[:, 0].mean()), "after": float(b[:, 0].mean()), "change": change,
                "paired": (float(change - paired), float(change + paired)),
                "independent": (float(change - independent), float(change + independent))}
    words = a[:, 1]
    per_word = {side: side_values[:, 0].sum() / words.sum() for side, side_values in (("before", a), ("after", b))}
    log_rise = per_word["before"] - per_word["after"]  # log(perplexity after / before)
    paired = Z95 * ratio_stderr(b[:, 0] - a[:, 0], words)
    independent = Z95 * math.hypot(ratio_stderr(a[:, 0], words), ratio_stderr(b[:, 0], words))
    return {"kind": "perplexity", "before": math.exp(-per_word["before"]), "after": math.exp(-per_word["after"]),
            "change": math.expm1(log_rise), "paired": (math.expm1(log_rise - paired), math.expm1(log_rise + paired)),
            "independent": (math.expm1(log_rise - independent), math.expm1(log_rise + independent))}


def last_state(states_dir: Path) -> Path:
    paths = saved_states(states_dir)
    if not paths:
        raise FileNotFoundError(f"{states_dir}: no saved edit states; run the workflow first")
    return paths[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    full = load_config(args.config)
    name = full["model"]["name"]
    config = model_config(full, name)
    resources, results = ROOT / "resources" / full["run"] / name, ROOT / "results" / full["run"] / name
    tasks_dir = resources / "data" / "tasks"
    tasks = config["downstream"]["tasks"]
    sequential = config["experiments"]["sequential"]

    base_stage = stage_config(config, "downstream_base", None)
    model, tokenizer = load_configured_model(base_stage, resources / "model")
    before = per_item(model, tokenizer, downstream_arguments(base_stage, tasks_dir, None), tasks)
    print("| method | task | edits | before | after | change | paired 95% interval | independent 95% interval |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    for method in sequential["methods"]:
        stage = stage_config(config, "downstream_sequential", method)
        for batch_size in sequential["batch_sizes"]:
            path = last_state(results / "states" / "sequential" / method / f"b{batch_size}-s0")
            labels = state_labels(path)
            moments = resources / "stats" / "second_moments.safetensors"
            ctx = ExperimentContext(model, tokenizer, name, load_moments(moments, labels["layers"]) if moments.exists() else {})
            session = ctx.session(edit_spec(stage, method, labels["layers"]))
            try:
                state, _ = load_tensors(path)
                session.restore()
                session.load_state_dict(state)
                after = per_item(model, tokenizer, downstream_arguments(stage, tasks_dir, method), tasks)
            finally:
                session.close()
            for task in before:
                c = compare(before[task], after[task])
                share = c["kind"] == "perplexity"

                def number(value: float) -> str:
                    return f"{value:+.1%}" if share else f"{value:+.3f}"

                print(f"| {method} b={batch_size} | {task} ({c['kind']}) | {labels['n_edits']} | {c['before']:.3f} | "
                      f"{c['after']:.3f} | {number(c['change'])} | [{number(c['paired'][0])}, {number(c['paired'][1])}] | "
                      f"[{number(c['independent'][0])}, {number(c['independent'][1])}] |", flush=True)


if __name__ == "__main__":
    main()
