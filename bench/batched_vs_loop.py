"""Target values z and CounterFact evaluation: batched over many facts vs one fact at a time.

z: `optimize_targets` on all N requests at once (independent deltas, per-fact Adam and early stop,
chunked by `facts_per_chunk`) vs the per-fact loop the reference implementations run (one call per
request). Evaluation: `counterfact_scores` on all records in padded batches vs one record per call.
Both variants of each run alternately in this process on the same model; ratios of medians.

    python bench/batched_vs_loop.py                 # z for 256 facts, eval of 256 records
    python bench/batched_vs_loop.py --quick
"""

from __future__ import annotations

import torch

from common import base_parser, interleaved, load_bench, median, print_table, runs, setup, take_requests
from editlib.metrics import counterfact_scores
from editlib.models import model_layout
from editlib.templates import MEMIT_LENGTHS, sample_context_templates
from editlib.values import TargetHparams, optimize_targets


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
    # early stop off so both variants do the same number of steps per fact
    hp = TargetHparams(v_num_grad_steps=args.steps, early_stop_loss=0.0, facts_per_chunk=args.chunk)
    print(f"# {bench.source}")
    print(f"# {len(requests)} facts, layer {args.layer}, {len(templates)} context templates, {hp}")

    results = {}

    def batched():
        results["batched"] = optimize_targets(bench.model, bench.tokenizer, requests, templates, module, hp, False)

    def per_fact():
        parts = [optimize_targets(bench.model, bench.tokenizer, [r], templates, module, hp, False) for r in requests]
        results["per fact"] = torch.cat([p.values for p in parts], dim=1)

    times = interleaved({"batched": batched, "per fact": per_fact}, args.repeats)
    diff = (results["batched"].values - results["per fact"]).abs().max().item()
    scale = results["per fact"].abs().max().item()
    print(f"\n## target values z for {len(requests)} facts ({args.repeats} interleaved repeats)")
    print_table([{"variant": k, "median s": median(v), "runs s": runs(v), "facts/s": len(requests) / median(v)}
                 for k, v in times.items()])
    print(f"\nspeed-up batched vs per fact (ratio of medians): {median(times['per fact']) / median(times['batched']):.2f}x")
    print(f"results agree: max |z_batched - z_per_fact| = {diff:.3g} (max |z| = {scale:.3g})")

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
