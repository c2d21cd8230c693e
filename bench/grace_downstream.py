"""GRACE's downstream scoring on SmolLM2: batches of one length against one request per batch.

A GRACE codebook reads each sequence's last token. lm-eval's HFLM loop right-pads a batch and
passes no attention mask, so a shorter row's last position would be padding, and GRACE's
downstream scoring used to run one request per batch. `EqualLengthBatches`
(`evaluate_downstream(..., share_contexts=False, equal_length_batches=True)`, what the pipeline
runs for GRACE) puts the rows of one length in each batch instead. Both ways score the same
requests on the same edited model (a codebook of `--facts` GRACE edits at `--layer`), timed
interleaved; it prints the seconds of each, the ratio, the largest difference between the two
log-likelihoods of any choice, and how many predictions differ.

    python bench/grace_downstream.py --model-dir resources/smollm2-erosion/SmolLM2-135M-Instruct/model \
        --records resources/smollm2-erosion/SmolLM2-135M-Instruct/data/records.json \
        --tasks-dir resources/smollm2-erosion/SmolLM2-135M-Instruct/data/tasks --tasks country_facts_unedited

`make bench` (bench/run.py) runs `standing`: configs/smollm2.yaml's tasks, 10 items each.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from common import (SMOLLM2_CONFIG, add_prepared_smollm2_arguments, base_parser, interleaved, item_agreement, median,
                    print_table, result_row, runs, setup)

from editlib.data.records import load_requests
from editlib.eval.downstream import lm_eval_results
from editlib.methods.grace import GraceHparams
from editlib.methods.grace.session import GraceEditor
from editlib.model.layout import model_layout
from editlib.model.loading import load_model

VARIANTS = {"one length per batch": True, "one request per batch": False}


def compare(model, tokenizer, tasks_dir: Path, tasks: list[str], limit: int | None, batch_size: int,
            repeats: int) -> tuple[dict, dict]:
    """Seconds of each way (VARIANTS, interleaved) and how they compare: items, requests, the
    largest log-likelihood difference (gap) and the predictions that differ (flipped)."""
    results: dict[str, dict] = {}

    def run(name: str):
        def evaluate():
            results[name] = lm_eval_results(
                model, tokenizer, tasks, include_path=tasks_dir.resolve(), limit=limit, log_samples=True,
                batch_size=batch_size if VARIANTS[name] else 1, share_contexts=False,
                equal_length_batches=VARIANTS[name])
        return evaluate

    times = interleaved({name: run(name) for name in VARIANTS}, repeats, warmup=False)
    alone, n_items, gap, flipped = item_agreement(results["one length per batch"], results["one request per batch"])
    requests = sum(len(row["loglikelihoods"]) for row in alone.values())
    return times, {"items": n_items, "requests": requests, "gap": gap, "flipped": flipped}


def edited(model, tokenizer, records: Path, facts: int, layer: int, n_iter: int) -> GraceEditor:
    """A GRACE codebook of the first `facts` records at `layer` (the caller removes it)."""
    editor = GraceEditor(model, tokenizer, model_layout(model).rewrite(layer), GraceHparams(n_iter=n_iter))
    editor.edit(load_requests(records)[:facts])
    return editor


def standing(ctx, limit: int = 10, facts: int = 4) -> list[dict]:
    """bench/run.py: configs/smollm2.yaml's downstream tasks on SmolLM2 with `facts` GRACE edits at
    its GRACE layer, `limit` items each, one interleaved run of each way."""
    model, tokenizer = ctx.smollm2()
    config = yaml.safe_load(SMOLLM2_CONFIG.read_text())
    settings, grace = config["downstream"], config["methods"]["grace"]
    editor = edited(model, tokenizer, ctx.smollm2_records(), facts, grace["layers"][0], grace["n_iter"])
    try:
        times, a = compare(model, tokenizer, ctx.smollm2_tasks(), settings["tasks"], limit, settings["batch_size"], 1)
    finally:
        editor.remove()
    return [result_row("grace_downstream", f"lm-eval, {len(settings['tasks'])} tasks x {limit} items, SmolLM2-135M "
                       f"with {facts} GRACE edits ({a['requests']} requests)",
                       f"HFLM, rows of one length per batch (batch size {settings['batch_size']})",
                       "HFLM, one request per batch", median(times["one length per batch"]),
                       median(times["one request per batch"]),
                       f"max |log-likelihood difference| {a['gap']:.2g}, {a['flipped']} predictions differ")]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    add_prepared_smollm2_arguments(parser)
    parser.add_argument("--tasks-dir", required=True, help="its lm-eval task YAMLs (rule prepare_data)")
    parser.add_argument("--tasks", default="country_facts_unedited", help="comma-separated multiple-choice tasks")
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=32, help="lm-eval batch size of the batched way")
    parser.add_argument("--facts", type=int, default=4, help="GRACE edits in the codebook")
    parser.add_argument("--layer", type=int, default=6, help="GRACE layer (configs/smollm2.yaml: 6)")
    parser.add_argument("--n-iter", type=int, default=50)
    args = parser.parse_args()
    if args.quick:
        args.limit, args.facts, args.n_iter, args.repeats = 20, 1, 5, 1
    setup(args)
    model, tokenizer = load_model(args.model_dir)
    tasks = args.tasks.split(",")
    editor = edited(model, tokenizer, Path(args.records), args.facts, args.layer, args.n_iter)
    print(f"# {args.model_dir}: {', '.join(tasks)}, {args.limit or 'all'} items each; {args.facts} GRACE edits at "
          f"layer {args.layer}; batched way at lm-eval batch size {args.batch_size}")
    try:
        times, a = compare(model, tokenizer, Path(args.tasks_dir), tasks, args.limit, args.batch_size, args.repeats)
    finally:
        editor.remove()
    base = median(times["one request per batch"])
    print_table([{"variant": name, "median s": median(times[name]), "runs s": runs(times[name]),
                  "x faster than one per batch": base / median(times[name])} for name in VARIANTS])
    print(f"# {a['items']} items, {a['requests']} requests; largest |log-likelihood difference| {a['gap']:.3g}; "
          f"predictions that differ: {a['flipped']} of {a['items']}")


if __name__ == "__main__":
    main()
