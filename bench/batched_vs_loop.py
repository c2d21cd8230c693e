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
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from common import base_parser, interleaved, load_bench, median, print_table, runs, setup, take_requests
from editlib.eval.metrics import counterfact_scores
from editlib.model.layout import model_layout
from editlib.methods.hparams import MEMIT_LENGTHS
from editlib.editing.templates import sample_context_templates
from editlib.editing.values import TargetHparams, optimize_targets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_z import reference_z  # noqa: E402


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

    variants = {"batched": batched, "batched, whole prompts": batched_no_cache, "per fact, our code": per_fact,
                "per fact, reference loop": reference_loop}
    times = interleaved(variants, args.repeats)
    reference = results["per fact, reference loop"]
    print(f"\n## target values z for {len(requests)} facts ({args.repeats} interleaved repeats)")
    print_table([{"variant": k, "median s": median(v), "runs s": runs(v), "facts/s": len(requests) / median(v),
                  "batched is x faster": median(v) / median(times["batched"]),
                  "max |z - z_reference|": (results[k] - reference).abs().max().item()}
                 for k, v in times.items()])
    print(f"(max |z| = {reference.abs().max().item():.3g})")

    scores = {}

    def eval_batched():
        scores["batched"] = counterfact_scores(bench.model, bench.tokenizer, requests)

    def eval_per_record():
        import pandas as pd

        scores["per record"] = pd.concat([counterfact_scores(bench.model, bench.tokenizer, [r]) for r in requests],
                                         ignore_index=True)

    times = interleaved({"batched": eval_batched, "per record": eval_per_record}, args.repeats)
    a, b = scores["batched"], scores["per record"]
    numeric = a.select_dtypes("number").columns
    diff = (a[numeric] - b[numeric]).abs().max().max()
    print(f"\n## CounterFact scoring of {len(requests)} records ({len(a)} prompts)")
    print_table([{"variant": k, "median s": median(v), "runs s": runs(v), "records/s": len(requests) / median(v)}
                 for k, v in times.items()])
    print(f"\nspeed-up batched vs per record (ratio of medians): {median(times['per record']) / median(times['batched']):.2f}x")
    print(f"results agree: max abs difference over all score columns = {diff:.3g}")


if __name__ == "__main__":
    main()
