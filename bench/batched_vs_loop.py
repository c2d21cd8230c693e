"""Target values z and CounterFact evaluation: batched over many facts vs one fact at a time.

z, three variants on the same N requests:
- batched: `optimize_targets` on all N at once (independent deltas, per-fact Adam and early stop,
  chunks of `facts_per_chunk`, the tokens before each subject run once into a key/value cache);
- per fact, our code: the same function called once per request (isolates what batching buys);
- per fact, reference loop: `tests/reference_z.py`, a direct transcription of MEMIT's compute_z
  (one fact at a time, whole prompts re-run every step, full-vocabulary logits at every position),
  the loop the reference implementations run.
Evaluation: `counterfact_scores` on all records in padded batches vs one record per call.
All variants run alternately in this process on the same model; ratios of medians.

    python bench/batched_vs_loop.py --threads 2     # z for 256 facts, eval of 256 records
    python bench/batched_vs_loop.py --quick

`make bench` (bench/run.py) runs `standing`: z and scoring for 32 facts, 2 repeats.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from common import (base_parser, interleaved, load_bench, median, print_table, result_row, runs, setup,
                    take_requests)
from editlib.eval.metrics import counterfact_scores
from editlib.model.layout import model_layout
from editlib.editing.hparams import MEMIT_LENGTHS
from editlib.editing.templates import sample_context_templates
from editlib.editing.hparams import TargetHparams
from editlib.editing.values import optimize_targets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_z import reference_z  # noqa: E402


Z_VARIANTS = ("batched", "batched, whole prompts", "per fact, our code", "per fact, reference loop")


def z_times(bench, requests, templates, module, hp, repeats: int) -> tuple[dict, dict]:
    """Seconds of each z variant (Z_VARIANTS, interleaved) and each variant's z, (d, N)."""
    results = {}

    def batched():
        results["batched"] = optimize_targets(bench.model, bench.tokenizer, requests, templates, module, hp,
                                              False).values

    def batched_no_cache():
        no_cache = dataclasses.replace(hp, cache_prefix=False)
        results["batched, whole prompts"] = optimize_targets(bench.model, bench.tokenizer, requests, templates,
                                                             module, no_cache, False).values

    def per_fact():
        parts = [optimize_targets(bench.model, bench.tokenizer, [r], templates, module, hp, False) for r in requests]
        results["per fact, our code"] = torch.cat([p.values for p in parts], dim=1)

    def reference_loop():
        parts = [reference_z(bench.model, bench.tokenizer, r, templates, module, hp)[0] for r in requests]
        results["per fact, reference loop"] = torch.stack(parts, dim=1)

    variants = dict(zip(Z_VARIANTS, (batched, batched_no_cache, per_fact, reference_loop)))
    return interleaved(variants, repeats), results


def eval_times(bench, requests, repeats: int) -> tuple[dict, object, float]:
    """Seconds of CounterFact scoring batched and one record per call (interleaved), the batched
    scores, and the largest difference between the two over all score columns."""
    import pandas as pd

    scores = {}

    def eval_batched():
        scores["batched"] = counterfact_scores(bench.model, bench.tokenizer, requests)

    def eval_per_record():
        scores["per record"] = pd.concat([counterfact_scores(bench.model, bench.tokenizer, [r]) for r in requests],
                                         ignore_index=True)

    times = interleaved({"batched": eval_batched, "per record": eval_per_record}, repeats)
    a, b = scores["batched"], scores["per record"]
    numeric = a.select_dtypes("number").columns
    return times, a, float((a[numeric] - b[numeric]).abs().max().max())


def standing(ctx, facts: int = 32, layer: int = 1, repeats: int = 2) -> list[dict]:
    """bench/run.py: z for `facts` facts at the toy bench model's `layer` (25 steps, early stop off,
    one chunk), the batched path against the reference loop and against itself without each of its
    two savings; then the CounterFact scoring of the same records."""
    bench = ctx.toy_bench()
    requests = take_requests(bench, facts)
    templates = sample_context_templates(bench.model, bench.tokenizer, MEMIT_LENGTHS, 0)
    hp = TargetHparams(v_num_grad_steps=25, early_stop_loss=0.0, facts_per_chunk=facts)
    times, results = z_times(bench, requests, templates, model_layout(bench.model).block(layer), hp, repeats)
    reference = results["per fact, reference loop"]
    case = f"z of {facts} facts, bench model layer {layer}, {len(templates)} templates, 25 Adam steps"
    baselines = {"per fact, reference loop": "one fact at a time, whole prompts, full logits (tests/reference_z.py)",
                 "batched, whole prompts": "the same, whole prompts every step (no prefix cache)",
                 "per fact, our code": "the same, one fact per call (no batching)"}
    rows = [result_row("batched_vs_loop", case, "batched, prefix cache (optimize_targets)", label,
                       median(times["batched"]), median(times[name]),
                       f"max |z - z reference| {(results['batched'] - reference).abs().max().item():.2g}"
                       f" (max |z| {reference.abs().max().item():.2g})")
            for name, label in baselines.items()]
    times, scores, diff = eval_times(bench, requests, repeats)
    rows.append(result_row("batched_vs_loop", f"CounterFact scoring of {facts} records ({len(scores)} prompts), "
                           "bench model", "batched (counterfact_scores)", "one record per call",
                           median(times["batched"]), median(times["per record"]),
                           f"max score difference {diff:.2g}"))
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=256)
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--steps", type=int, default=25, help="v_num_grad_steps (the paper's 25)")
    parser.add_argument("--chunk", type=int, default=64, help="facts_per_chunk of the batched variant")
    args = parser.parse_args()
    if args.quick:
        args.facts, args.repeats = min(args.facts, 32), min(args.repeats, 2)
    setup(args)
    bench = load_bench(args)
    layout = model_layout(bench.model)
    requests = take_requests(bench, args.facts)
    templates = sample_context_templates(bench.model, bench.tokenizer, MEMIT_LENGTHS, 0)
    module = layout.block(args.layer)
    # early stop off so every variant does the same number of steps per fact
    hp = TargetHparams(v_num_grad_steps=args.steps, early_stop_loss=0.0, facts_per_chunk=args.chunk)
    print(f"# {bench.source}")
    print(f"# {len(requests)} facts, layer {args.layer}, {len(templates)} context templates, {hp}")

    times, results = z_times(bench, requests, templates, module, hp, args.repeats)
    reference = results["per fact, reference loop"]
    print(f"\n## target values z for {len(requests)} facts ({args.repeats} interleaved repeats)")
    print_table([{"variant": k, "median s": median(v), "runs s": runs(v), "facts/s": len(requests) / median(v),
                  "batched is x faster": median(v) / median(times["batched"]),
                  "max |z - z_reference|": (results[k] - reference).abs().max().item()}
                 for k, v in times.items()])
    print(f"(max |z| = {reference.abs().max().item():.3g})")

    times, a, diff = eval_times(bench, requests, args.repeats)
    print(f"\n## CounterFact scoring of {len(requests)} records ({len(a)} prompts)")
    print_table([{"variant": k, "median s": median(v), "runs s": runs(v), "records/s": len(requests) / median(v)}
                 for k, v in times.items()])
    print(f"\nspeed-up batched vs per record (ratio of medians): {median(times['per record']) / median(times['batched']):.2f}x")
    print(f"results agree: max abs difference over all score columns = {diff:.3g}")


if __name__ == "__main__":
    main()
