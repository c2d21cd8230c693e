"""Second-moment statistics for a layer sweep: one pass for all layers vs one pass per layer.

The per-layer variant is the reference behaviour (docs/methods.md §4): one full data pass per layer, each
forward stopping after that layer, i.e. `collect_second_moments(..., [layer], ...)` per layer. The
one-pass variant is `collect_second_moments(..., layers, ...)`. Both run alternately in this process
on the same model and corpus; the table gives the median time of each, the ratio of medians, the
corpus tokens per second, and the largest difference between the two results.

    python bench/stats_one_pass.py                 # 6-layer sweep (layers 0-5), 1024 wiki documents
    python bench/stats_one_pass.py --quick
    python bench/stats_one_pass.py --profile       # also: where the time goes, per variant
    python bench/stats_one_pass.py --random-model --model-layers 32 --layers 0-31 --docs 128   # paper-depth sweep

`make bench` (bench/run.py) runs `standing`: both sweeps above, at these sizes.
"""

from __future__ import annotations

import time

import torch

from common import base_parser, interleaved, load_bench, median, print_table, result_row, runs, setup
from editlib.model.hooks import capture_inputs, run_until
from editlib.model.layout import model_layout
from editlib.editing.statistics import StatsConfig, collect_second_moments
from editlib.model.tokens import length_sorted_chunks, pad_id, pad_right


def parse_layers(text: str) -> list[int]:
    if "-" in text:
        first, last = map(int, text.split("-"))
        return list(range(first, last + 1))
    return [int(x) for x in text.split(",")]


def one_pass(bench, layout, layers, texts, config):
    return collect_second_moments(bench.model, bench.tokenizer, layout, layers, texts, config, progress=False)


def per_layer(bench, layout, layers, texts, config):
    result = {}
    for layer in layers:
        result.update(collect_second_moments(bench.model, bench.tokenizer, layout, [layer], texts, config, progress=False))
    return result


def compare(bench, layout, layers, texts, config, repeats: int) -> tuple[dict, dict]:
    """Seconds of each variant ({"one pass": [...], "per layer": [...]}, interleaved) and how far
    their statistics agree (max_abs, max_rel, same_count, tokens)."""
    results = {}

    def run(name, fn):
        def call():
            results[name] = fn(bench, layout, layers, texts, config)
        return call

    times = interleaved({"one pass": run("one pass", one_pass), "per layer": run("per layer", per_layer)}, repeats)
    a, b = results["one pass"], results["per layer"]
    agreement = {"tokens": a[layers[0]].count,
                 "max_abs": max(float((a[l].mean - b[l].mean).abs().max()) for l in layers),
                 "max_rel": max(float((a[l].total - b[l].total).norm() / b[l].total.norm()) for l in layers),
                 "same_count": all(a[l].count == b[l].count for l in layers)}
    return times, agreement


def standing(ctx) -> list[dict]:
    """bench/run.py: a 6-layer sweep on the toy bench model (1,024 documents, 3 repeats) and a
    32-layer sweep on a random-weight Llama of Llama-3-8B's depth (128 documents, 2 repeats)."""
    rows = []
    sweeps = [(ctx.toy_bench(), 6, 1024, 3, "bench model"),
              (ctx.random_bench(32), 32, 128, 2, "random-weight Llama, the bench model's width")]
    for bench, depth, docs, repeats, model in sweeps:
        layers = list(range(depth))
        texts = bench.texts[:docs]
        times, agreement = compare(bench, model_layout(bench.model), layers, texts, StatsConfig(max_length=512),
                                   repeats)
        check = (f"max |C one - C per layer| {agreement['max_abs']:.2g}, token counts "
                 f"{'equal' if agreement['same_count'] else 'DIFFER'}")
        rows.append(result_row("stats_one_pass", f"second moments of layers 0-{depth - 1}, {model} {depth}L, "
                               f"{len(texts)} docs ({agreement['tokens']:,} tokens)",
                               "one pass for all layers", "one pass per layer (the reference)",
                               median(times["one pass"]), median(times["per layer"]), check))
    return rows


@torch.no_grad()
def breakdown(bench, layout, layers, texts, config: StatsConfig) -> list[dict]:
    """Time of the parts of one collection pass: tokenisation, forward to each depth, the k k^T GEMMs.

    Measured separately (same batches as collect_second_moments), to explain the ratio: the forward
    cost of a pass grows with its depth; the accumulation costs the same in both variants.
    """
    model, tokenizer = bench.model, bench.tokenizer
    start = time.perf_counter()
    encoded = tokenizer(list(texts), truncation=True, max_length=config.max_length)["input_ids"]
    tokenize = time.perf_counter() - start
    chunks = length_sorted_chunks([len(x) for x in encoded], max_rows=10**9, max_tokens=config.batch_tokens)
    batches = [pad_right([encoded[i] for i in chunk], pad_id(tokenizer)) for chunk in chunks]
    forward = {}
    for layer in layers:
        name = layout.rewrite(layer)
        start = time.perf_counter()
        with capture_inputs(model, [name]):
            for batch in batches:
                run_until(model, name, input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        forward[layer] = time.perf_counter() - start
    names = [layout.rewrite(layer) for layer in layers]
    feats = []
    with capture_inputs(model, names, stop_after=names[-1]) as captured:
        for batch in batches[: max(1, len(batches) // 4)]:
            run_until(model, None, input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            feats.append(captured[names[-1]][batch.attention_mask.bool()].float())
    start = time.perf_counter()
    for f in feats:
        f.T @ f
    gram_quarter = time.perf_counter() - start
    gram = gram_quarter * len(batches) / max(1, len(batches) // 4)  # one layer's accumulation, whole corpus
    return [
        {"part": "tokenise corpus (once per pass)", "seconds": tokenize},
        *({"part": f"forward to layer {l} (hooks, stop after it)", "seconds": forward[l]} for l in layers),
        {"part": "k k^T accumulation, one layer", "seconds": gram},
        {"part": "model: one pass = tok + fwd(deepest) + L*acc",
         "seconds": tokenize + forward[max(layers)] + len(layers) * gram},
        {"part": "model: per layer = L*tok + sum fwd(l) + L*acc",
         "seconds": len(layers) * tokenize + sum(forward.values()) + len(layers) * gram},
    ]


def profile(fn, label: str, rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"\n## torch.profiler, {label} (top {rows} ops by self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--layers", default="0-5", help="layer sweep: 'first-last' or 'a,b,c'")
    parser.add_argument("--docs", type=int, default=1024, help="statistics corpus size (wiki documents)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--profile", action="store_true", help="print a time breakdown and torch.profiler tables")
    args = parser.parse_args()
    if args.quick:
        args.docs, args.repeats = min(args.docs, 256), min(args.repeats, 2)
    setup(args)
    bench = load_bench(args)
    layout = model_layout(bench.model)
    layers = parse_layers(args.layers)
    texts = bench.texts[: args.docs]
    config = StatsConfig(max_length=args.max_length, batch_tokens=args.batch_tokens, dtype=args.dtype)
    print(f"# {bench.source}")
    print(f"# layers {layers}, {len(texts)} documents, {config}")

    times, agreement = compare(bench, layout, layers, texts, config, args.repeats)
    tokens = agreement["tokens"]
    rows = [{"variant": name, "median s": median(t), "runs s": runs(t), "corpus tok/s": tokens / median(t),
             "layer-tok/s": tokens * len(layers) / median(t)} for name, t in times.items()]
    print(f"\n## {len(layers)}-layer sweep, {tokens} tokens per pass, {args.repeats} interleaved repeats")
    print_table(rows)
    ratio = median(times["per layer"]) / median(times["one pass"])
    print(f"\nspeed-up one pass vs per layer (ratio of medians): {ratio:.2f}x")
    print(f"results identical: max |C_one - C_per| = {agreement['max_abs']:.3g}, max relative Frobenius diff of "
          f"sums = {agreement['max_rel']:.3g}, token counts equal: {agreement['same_count']}")
    if args.profile:
        print("\n## where the time goes (separately timed parts; seconds for the whole corpus)")
        print_table(breakdown(bench, layout, layers, texts, config))
        profile(lambda: one_pass(bench, layout, layers, texts, config), "one pass")
        profile(lambda: per_layer(bench, layout, layers, texts, config), "per layer")


if __name__ == "__main__":
    main()
