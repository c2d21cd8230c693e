"""Downstream evaluation (lm-eval multiple choice) on a prepared model: one pass per context vs lm-eval's loop.

Two ways to score the same lm-eval requests on the same in-memory model, timed interleaved:
- "one pass per context": `editlib.eval.downstream.shared_context_lm_class` (the default of
  `evaluate_downstream`): each distinct few-shot context runs once into a key/value cache, in
  length-sorted batches, logits only where a continuation token is scored, every choice continued
  from the cache;
- "lm-eval per request": lm-eval's own HFLM loop (`share_contexts=False`), one right-padded row per
  (context, choice) at the config's batch size, full-vocabulary log-softmax at every position.

It prints the seconds of each, the ratio, the largest difference between the two log-likelihoods
of any choice, how many predictions differ, and the token counts: the tokens HFLM runs (every
request whole) against the tokens of the distinct contexts plus the choices.

    python bench/downstream_speed.py --model-dir resources/smollm2/SmolLM2-135M-Instruct/model \
        --tasks-dir resources/smollm2/SmolLM2-135M-Instruct/data/tasks

`make bench` (bench/run.py) runs `standing`: the same tasks, 10 items each, one run of each way.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from common import SMOLLM2_CONFIG, base_parser, interleaved, item_agreement, median, print_table, result_row, runs, setup

from editlib.eval.downstream import lm_eval_results
from editlib.model.loading import load_model

VARIANTS = {"one pass per context": True, "lm-eval per request": False}


def compare(model, tokenizer, tasks_dir: Path, settings: dict, repeats: int) -> tuple[dict, dict]:
    """Seconds of each way (VARIANTS, interleaved) on the config's `downstream` `settings`, and how
    they compare: items, requests, the largest log-likelihood difference (gap), the predictions
    that differ (flipped), the tokens lm-eval runs (whole) and the distinct ones (distinct)."""
    tasks = settings["tasks"]
    results: dict[str, dict] = {}

    def run(name: str):
        def evaluate():
            results[name] = lm_eval_results(
                model, tokenizer, tasks, include_path=tasks_dir.resolve(), limit=settings["limit"],
                batch_size=settings["batch_size"], num_fewshot=settings["num_fewshot"], log_samples=True,
                share_contexts=VARIANTS[name])
        return evaluate

    times = interleaved({name: run(name) for name in VARIANTS}, repeats, warmup=False)
    _, n_items, gap, flipped = item_agreement(results["one pass per context"], results["lm-eval per request"])

    samples = [sample for task in results["lm-eval per request"]["samples"].values() for sample in task]
    whole = sum(len(tokenizer(c + x)["input_ids"]) for s in samples for c, x in s["arguments"])
    contexts = {c for s in samples for c, _ in s["arguments"]}
    distinct = sum(len(tokenizer(c)["input_ids"]) for c in contexts) + sum(
        len(tokenizer(c + x)["input_ids"]) - len(tokenizer(c)["input_ids"]) for s in samples for c, x in s["arguments"])
    return times, {"items": n_items, "requests": sum(len(s["arguments"]) for s in samples), "gap": gap,
                   "flipped": flipped, "whole": whole, "distinct": distinct}


def standing(ctx, limit: int = 10) -> list[dict]:
    """bench/run.py: configs/smollm2.yaml's downstream tasks on SmolLM2, `limit` items each, one
    interleaved run of each way."""
    model, tokenizer = ctx.smollm2()
    tasks_dir = ctx.smollm2_tasks()
    settings = {**yaml.safe_load(SMOLLM2_CONFIG.read_text())["downstream"], "limit": limit}
    times, a = compare(model, tokenizer, tasks_dir, settings, 1)
    return [result_row("downstream_speed", f"lm-eval, {len(settings['tasks'])} tasks x {limit} items, "
                       f"{settings['num_fewshot']}-shot, SmolLM2-135M ({a['requests']} requests)",
                       "each context once into a key/value cache (shared_context_lm_class)",
                       f"lm-eval's HFLM, one row per request (batch size {settings['batch_size']})",
                       median(times["one pass per context"]), median(times["lm-eval per request"]),
                       f"max |log-likelihood difference| {a['gap']:.2g}, {a['flipped']} predictions differ")]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="a prepared model folder (rule prepare_model)")
    parser.add_argument("--tasks-dir", required=True, help="its lm-eval task YAMLs (rule prepare_data)")
    parser.add_argument("--config", default="configs/smollm2.yaml", help="the config whose downstream block to run")
    args = parser.parse_args()
    settings = yaml.safe_load(Path(args.config).read_text())["downstream"]
    if args.quick:
        settings["limit"], args.repeats = 5, 1
    setup(args)
    model, tokenizer = load_model(args.model_dir)
    tasks = settings["tasks"]
    print(f"# {args.model_dir}: {', '.join(tasks)}; {settings['limit']} items each, "
          f"{settings['num_fewshot']}-shot, lm-eval batch size {settings['batch_size']}")

    times, agreement = compare(model, tokenizer, Path(args.tasks_dir), settings, args.repeats)
    base = median(times["lm-eval per request"])
    print_table([{"variant": name, "median s": median(times[name]), "runs s": runs(times[name]),
                  "x faster than lm-eval": base / median(times[name])} for name in VARIANTS])
    a = agreement
    print(f"# {a['items']} items, {a['requests']} requests; tokens run by lm-eval {a['whole']}, distinct contexts + "
          f"choices {a['distinct']} ({a['whole'] / a['distinct']:.2f}x fewer)")
    print(f"# largest |log-likelihood difference| {a['gap']:.3g}; predictions that differ: {a['flipped']} of "
          f"{a['items']}")


if __name__ == "__main__":
    main()
