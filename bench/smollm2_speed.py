"""Target values z and CounterFact scoring on SmolLM2-135M: measured time against the FLOP bound.

z: `optimize_targets` on one chunk of facts, as many as the config's facts_per_chunk for ROME and for
MEMIT (configs/smollm2.yaml: 16 and 32) (early stop off, so every variant runs the same
number of Adam steps; every step runs, the last one without an update), at ROME's hook (an MLP output, 21 context templates, 20 steps) and at
MEMIT's (a block output, 6 templates, 25 steps), four ways: "own blocks" (the default: the blocks
above the edited one run as editlib.model.upper_blocks, everything below once; the tokens several cached
prefixes start with run once), "own blocks, whole prefixes" (the same, every prefix run whole),
and through the model's own modules with a hook, the blocks below the edited one replayed after
the first step or re-run at every step. The matrix-multiply FLOPs each variant executes are counted
with torch.utils.flop_counter (forward and backward; from runs of 2 and 3 steps, since every step
after the first costs the same); the bound is those FLOPs at the fp32
GEMM rate this process measures on the same threads, probed just before and just after each run
(the rate drifts by 10-30% within minutes on a shared machine), so "x bound" = time / (FLOPs /
GEMM rate around that run), the median over runs.
"products alone": the same matrix products (operators, shapes, strides and counts recorded from
those runs, `out=` overloads included) timed on their own, each distinct product best of 5, nothing
else in between: the time the products need at the shapes z runs them, so "products alone x bound"
is how far those shapes fall short of the GEMM rate.
"products in sequence" (`--products-in-sequence`): every product of one whole z run replayed in the
order it ran, back to back, on operands laid out as the originals were (the same weights, buffers
that shared memory share it again), nothing else in between, timed once per repeat between the z
runs: what z's products cost on this machine as they run, one after another, at its sustained
rate. "x bound" / "products in sequence x bound" is then what everything that is not a matrix
product (attention softmax, norms, activations, rotary, gathers, the optimiser, Python) adds.

Scoring: the CounterFact prompts of N records (rewrite, paraphrases, neighbourhood; new and true
target each) scored four ways:
- batched: `counterfact_scores` on all records (length-sorted padded passes, logits only at
  target positions, each prompt run once into a cache, both targets' first tokens scored at its
  last position and longer targets continued from the cache);
- batched, whole rows: the same with every prompt + target row run whole (`share_prompts=False`);
- per record, our code: the same function once per record;
- per record, reference: a transcription of the reference implementations' scoring
  (ROME/MEMIT `test_batch_prediction`): per record one padded pass over prompt + target for every
  prompt and both targets, full-vocabulary logits at every position, a log-softmax per target token.

    python bench/smollm2_speed.py --model-dir resources/smollm2/SmolLM2-135M-Instruct/model \
        --records resources/smollm2/SmolLM2-135M-Instruct/data/records.json

`make bench` (bench/run.py) runs `standing`: z at MEMIT's hook only (own blocks against the model's
modules, and against the FLOP bound), one run each, and the scoring of 32 records.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from common import (SMOLLM2_CONFIG, add_prepared_smollm2_arguments, base_parser, interleaved, median, print_table,
                    result_row, runs, setup)
from editlib.eval.metrics import PROMPT_KINDS, counterfact_scores
from editlib.model.loading import load_model
from editlib.model.layout import model_layout
from editlib.data.records import load_requests
from editlib.editing.hparams import MEMIT_LENGTHS, ROME_LENGTHS
from editlib.editing.templates import sample_context_templates
from editlib.model.tokens import pad_id, pad_right, prompt_ids, target_ids
from editlib.editing.hparams import TargetHparams
from editlib.editing.values import optimize_targets


Z_VARIANTS = ("own blocks", "own blocks, whole prefixes", "modules, replay lower blocks", "modules, re-run lower blocks")


def _best_seconds(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_rate(threads_note: str, size: tuple[int, int, int] = (2048, 576, 1536), repeats: int = 20) -> float:
    """fp32 GEMM FLOP/s of this process: the best of `repeats` multiplies of SmolLM2's MLP shape.
    Also printed: the mean rate of 300 back-to-back multiplies (about a second), what the machine
    sustains at the moment, which on a shared machine falls 10-25% below the best burst."""
    m, k, n = size
    rate = probe_rate(size, repeats)
    a, b = torch.randn(m, k), torch.randn(k, n)
    start = time.perf_counter()
    for _ in range(300):
        a @ b
    sustained = 300 * 2 * m * k * n / (time.perf_counter() - start)
    print(f"# fp32 GEMM {m}x{k} @ {k}x{n}: {rate / 1e9:.1f} GFLOP/s best of {repeats}, {sustained / 1e9:.1f} GFLOP/s "
          f"mean of 300 back to back ({threads_note})")
    return rate


def probe_rate(size: tuple[int, int, int] = (2048, 576, 1536), repeats: int = 10) -> float:
    """The same GEMM rate, measured quickly (best of `repeats`, about 0.2 s): taken before and
    after every timed run, since this rate drifts by 10-30% within minutes on a shared machine."""
    m, k, n = size
    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2 * m * k * n / _best_seconds(lambda: a @ b, repeats)


def probed(fn):
    """`fn` run once; (seconds, the mean of the GEMM rates probed just before and just after)."""
    before = probe_rate()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, (before + probe_rate()) / 2


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# every overload of the products z runs, `out=` ones included (the output matrix writes its logits
# into one buffer per chunk with mm.out)
MATMULS = (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm)


def _spec(value):
    """A product's operand as (shape, stride, storage, offset) for a tensor (storage: its data
    pointer and size in elements, so that operands sharing memory share it again when replayed)."""
    if not isinstance(value, torch.Tensor):
        return ("value", value)
    storage = value.untyped_storage()
    return ("tensor", tuple(value.shape), value.stride(),
            (storage.data_ptr(), storage.nbytes() // value.element_size()), value.storage_offset())


class RecordMatmuls(TorchDispatchMode):
    """Every matrix product a function runs, in order: operator, positional and keyword operands."""

    def __init__(self):
        super().__init__()
        self.sequence: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in MATMULS:
            self.sequence.append((func, tuple(_spec(a) for a in args),
                                  tuple((k, _spec(v)) for k, v in sorted(kwargs.items()))))
        return func(*args, **kwargs)


def recorded_matmuls(fn) -> list:
    """The matrix products `fn` runs, in order: (operator, operands, keyword operands)."""
    with RecordMatmuls() as recorder:
        fn()
    return recorder.sequence


def _fresh(spec):
    if spec[0] == "value":
        return spec[1]
    _, shape, stride, _, _ = spec
    size = 1 + sum((n - 1) * step for n, step in zip(shape, stride)) if all(shape) else 0
    return torch.randn(size).as_strided(shape, stride)


def matmul_seconds(calls: Counter, repeats: int = 5) -> float:
    """Time of the products in `calls` ((operator, operands, keyword operands) with shapes and
    strides -> count), each replayed alone on fresh operands (best of `repeats` per distinct
    product, times its count): what they cost with nothing else in between, at the shapes they
    run at."""
    total = 0.0
    for (func, operands, keywords), count in calls.items():
        args, kwargs = [_fresh(spec) for spec in operands], {k: _fresh(spec) for k, spec in keywords}
        total += _best_seconds(lambda: func(*args, **kwargs), repeats) * count
    return total


def shapes_only(sequence: list) -> Counter:
    """(operator, operands, keyword operands) by shape and stride -> count, for `matmul_seconds`."""
    def strip(spec):
        return spec if spec[0] == "value" else spec[:3] + (None, None)
    return Counter((func, tuple(strip(a) for a in args), tuple((k, strip(v)) for k, v in kwargs))
                   for func, args, kwargs in sequence)


def replay_in_order(sequence: list):
    """A function that runs the products of `sequence` in their order, back to back, on operands
    laid out as the originals were (operands that shared memory share it again), nothing else in
    between: what z's products cost on this machine in the order they run, without the rest."""
    storages: dict = {}
    for _, args, kwargs in sequence:
        for spec in (*args, *(v for _, v in kwargs)):
            if spec[0] == "tensor":
                key, size = spec[3]
                storages[key] = max(storages.get(key, 0), size)
    memory = {key: torch.randn(size) for key, size in storages.items()}

    def operand(spec):
        if spec[0] == "value":
            return spec[1]
        _, shape, stride, (key, _), offset = spec
        return memory[key].as_strided(shape, stride, offset)

    calls = [(func, [operand(a) for a in args], {k: operand(v) for k, v in kwargs}) for func, args, kwargs in sequence]

    def run():
        for func, args, kwargs in calls:
            func(*args, **kwargs)
    return run


def reference_scores(model, tokenizer, request) -> pd.DataFrame:
    """One record scored as the reference does: one pass, full logits, a loop over target tokens."""
    texts = {"rewrite": [request.text], "paraphrase": list(request.paraphrase_prompts),
             "neighborhood": list(request.neighborhood_prompts)}
    meta = [(request.case_id, kind, i) for kind in PROMPT_KINDS for i in range(len(texts[kind]))]
    prompts = [text for kind in PROMPT_KINDS for text in texts[kind]]
    p_ids = prompt_ids(tokenizer, prompts)
    new_ids, true_ids = target_ids(tokenizer, [request.target_new, request.target_true])
    rows = [p + t for p in p_ids for t in (new_ids, true_ids)]
    batch = pad_right(rows, pad_id(tokenizer))
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    nll = np.zeros(len(rows))
    for i in range(len(rows)):
        target = new_ids if i % 2 == 0 else true_ids
        start = len(p_ids[i // 2])
        for j, token in enumerate(target):
            nll[i] += -torch.log_softmax(logits[i, start + j - 1, :], dim=0)[token].item()
        nll[i] /= len(target)
    frame = pd.DataFrame(meta, columns=["case_id", "kind", "index"])
    frame["nll_new"], frame["nll_true"] = nll[0::2], nll[1::2]
    return frame


def z_run(model, tokenizer, facts, templates, module, hp: TargetHparams, variant: str, steps: int | None = None):
    """A function that optimises z for `facts` the way `variant` (one of Z_VARIANTS) does."""
    hp = dataclasses.replace(hp, v_num_grad_steps=steps or hp.v_num_grad_steps)
    return lambda: optimize_targets(model, tokenizer, facts, templates, module, hp, False,
                                    replay_lower_blocks=variant != "modules, re-run lower blocks",
                                    own_blocks=variant.startswith("own blocks"),
                                    share_stems=variant != "own blocks, whole prefixes")


def run_flops(make_run, steps: int) -> int:
    """Matrix-product FLOPs of a whole z run of `steps` steps, from runs of 2 and 3 steps (every
    step after the first costs the same); `make_run(steps)` returns the run."""
    two, three = counted_flops(make_run(2)), counted_flops(make_run(3))
    return two + (steps - 2) * (three - two)


def scoring_variants(model, tokenizer, records, scores: dict) -> dict:
    """The four ways to score `records`' CounterFact prompts; each stores its scores in `scores`."""

    def batched():
        scores["batched"] = counterfact_scores(model, tokenizer, records)

    def batched_whole_rows():
        scores["batched, whole rows"] = counterfact_scores(model, tokenizer, records, share_prompts=False)

    def per_record():
        scores["per record, our code"] = pd.concat([counterfact_scores(model, tokenizer, [r]) for r in records],
                                                   ignore_index=True)

    def per_record_reference():
        scores["per record, reference"] = pd.concat([reference_scores(model, tokenizer, r) for r in records],
                                                    ignore_index=True)

    return {"batched": batched, "batched, whole rows": batched_whole_rows, "per record, our code": per_record,
            "per record, reference": per_record_reference}


def nll_gap(scores: dict, name: str) -> float:
    """The largest |NLL difference| between variant `name`'s scores and the batched ones."""
    return float(np.abs(scores[name][["nll_new", "nll_true"]].to_numpy()
                        - scores["batched"][["nll_new", "nll_true"]].to_numpy()).max())


def standing(ctx, memit_layer: int = 6, eval_records: int = 32, facts: int | None = None) -> list[dict]:
    """bench/run.py: z at MEMIT's hook (a block output, 6 templates, 25 steps, early stop off, one
    chunk of `facts` facts, by default configs/smollm2.yaml's facts_per_chunk), the own blocks
    against the model's modules with the lower blocks replayed, one run each, and the own blocks
    against their FLOP bound (their matrix-product FLOPs at the fp32 GEMM rate probed around the
    run); then the CounterFact scoring of `eval_records` records, batched against the reference's
    per-record scoring."""
    model, tokenizer = ctx.smollm2()
    requests = load_requests(ctx.smollm2_records())
    n_facts = facts or yaml.safe_load(SMOLLM2_CONFIG.read_text())["methods"]["memit"]["targets"]["facts_per_chunk"]
    facts = requests[:n_facts]
    templates = sample_context_templates(model, tokenizer, MEMIT_LENGTHS, 0)
    module = model_layout(model).block(memit_layer)
    hp = TargetHparams(v_num_grad_steps=25, early_stop_loss=0.0, facts_per_chunk=len(facts))
    ours, theirs = "own blocks", "modules, replay lower blocks"
    flops = run_flops(lambda steps: z_run(model, tokenizer, facts, templates, module, hp, ours, steps), 25)
    own_s, rate = probed(z_run(model, tokenizer, facts, templates, module, hp, ours))
    modules_s, _ = probed(z_run(model, tokenizer, facts, templates, module, hp, theirs))
    case = f"z of {len(facts)} facts, SmolLM2-135M, MEMIT's hook (layer {memit_layer} output), 25 Adam steps"
    rows = [result_row("smollm2_speed", case, "own upper blocks (editlib.model.upper_blocks)",
                       "the model's modules with hooks, lower blocks replayed", own_s, modules_s),
            result_row("smollm2_speed", case, "own upper blocks (editlib.model.upper_blocks)",
                       "FLOP bound: its matrix-product FLOPs at the probed fp32 GEMM rate", own_s, flops / rate,
                       f"{flops / len(facts) / 1e9:.1f} GFLOP per fact at {rate / 1e9:.0f} GFLOP/s")]
    scores = {}
    variants = scoring_variants(model, tokenizer, requests[:eval_records], scores)
    times = interleaved({name: variants[name] for name in ("batched", "per record, reference")}, 1)
    rows.append(result_row("smollm2_speed", f"CounterFact scoring of {eval_records} records "
                           f"({len(scores['batched'])} prompts, 2 targets), SmolLM2-135M",
                           "batched, each prompt once (counterfact_scores)",
                           "per record, full logits (the reference's test_batch_prediction)",
                           median(times["batched"]), median(times["per record, reference"]),
                           f"max |NLL difference| {nll_gap(scores, 'per record, reference'):.2g}"))
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    add_prepared_smollm2_arguments(parser)
    parser.add_argument("--config", default="configs/smollm2.yaml",
                        help="the config whose ROME and MEMIT facts_per_chunk size the z chunks")
    parser.add_argument("--facts", type=int, default=None, help="facts in every z chunk (default: the config's)")
    parser.add_argument("--eval-records", type=int, default=64)
    parser.add_argument("--rome-layers", default="4,19", help="ROME hook layers (MLP outputs; empty: none)")
    parser.add_argument("--memit-layer", type=int, default=6)
    parser.add_argument("--products-in-sequence", action="store_true",
                        help="also time each z variant's matrix products replayed in their order, back to back, "
                             "nothing else in between (interleaved with the z runs; needs memory for every operand)")
    parser.add_argument("--skip-z", action="store_true")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--z-variants", default=",".join(Z_VARIANTS),
                        help=f"comma-separated z variants to time, of: {', '.join(Z_VARIANTS)}")
    args = parser.parse_args()
    if args.quick:
        args.facts, args.eval_records, args.repeats = 8, 8, 1
    methods = yaml.safe_load(Path(args.config).read_text())["methods"]
    chunk = {name: args.facts or methods[name]["targets"]["facts_per_chunk"] for name in ("rome", "memit")}
    setup(args)
    model, tokenizer = load_model(args.model_dir)
    layout = model_layout(model)
    requests = load_requests(args.records)
    print(f"# SmolLM2-135M-Instruct fp32 on cpu, {layout.n_layers} layers; {len(requests)} records in {args.records}")

    if not args.skip_z:
        gemm_rate(f"torch threads={args.threads}")
        cases = [(f"ROME, layer {layer} MLP output", layout.mlp(int(layer)), ROME_LENGTHS, 20, chunk["rome"])
                 for layer in args.rome_layers.split(",") if layer]
        cases.append((f"MEMIT, layer {args.memit_layer} block output", layout.block(args.memit_layer), MEMIT_LENGTHS, 25,
                      chunk["memit"]))
        rows = []
        for label, module, lengths, steps, n_facts in cases:
            facts = requests[:n_facts]
            templates = sample_context_templates(model, tokenizer, lengths, 0)
            hp = TargetHparams(v_num_grad_steps=steps, early_stop_loss=0.0, facts_per_chunk=len(facts))
            def run(variant: str, steps: int = steps):
                return z_run(model, tokenizer, facts, templates, module, hp, variant, steps)

            names = [name for name in Z_VARIANTS if name in args.z_variants.split(",")]
            variants = {name: run(name) for name in names}
            # FLOPs of 2 and 3 steps give the first step's and every later step's (all later steps are alike)
            flops, products, sequences = {}, {}, {}
            for name in names:
                flops[name] = run_flops(lambda n: run(name, n), steps)
                two, three = shapes_only(recorded_matmuls(run(name, 2))), shapes_only(recorded_matmuls(run(name, 3)))
                later = three.copy()
                later.subtract(two)  # one later step's products (every later step runs the same)
                before = probe_rate()
                seconds = matmul_seconds(Counter({key: two[key] + (steps - 2) * later[key] for key in three}))
                products[name] = seconds, (before + probe_rate()) / 2
                if args.products_in_sequence:
                    sequences[name] = replay_in_order(recorded_matmuls(variants[name]))
            # each run against the GEMM rate probed around it; the variants (and the replays of
            # their products in sequence) alternate
            measured = {name: [] for name in names}
            in_sequence = {name: [] for name in sequences}
            for _ in range(args.repeats):
                for name in names:
                    measured[name].append(probed(variants[name]))
                    if name in sequences:
                        in_sequence[name].append(probed(sequences[name]))
            times = {name: [seconds for seconds, _ in values] for name, values in measured.items()}
            for name, values in measured.items():
                seconds, rates = median(times[name]), [r for _, r in values]
                rows.append({"hook": label, "facts": len(facts), "templates": len(templates), "steps": steps,
                             "variant": name,
                             "median s": seconds, "runs s": runs(times[name]), "s per fact": seconds / len(facts),
                             "GFLOP per fact": flops[name] / len(facts) / 1e9,
                             "GEMM GFLOP/s around runs": " ".join(f"{r / 1e9:.0f}" for r in rates),
                             "bound s per fact": flops[name] / median(rates) / len(facts),
                             "x bound": median([t * r / flops[name] for t, r in values]),
                             "products alone s per fact": products[name][0] / len(facts),
                             "products alone x bound": products[name][0] * products[name][1] / flops[name],
                             **({"products in sequence x bound": median([t * r / flops[name] for t, r in in_sequence[name]]),
                                 "products in sequence runs s": runs([t for t, _ in in_sequence[name]])}
                                if name in in_sequence else {})})
            if len(names) == len(Z_VARIANTS):
                own, whole, replay, rerun = (median(times[n]) for n in Z_VARIANTS)
                print(f"# {label}: replaying the lower blocks is {rerun / replay:.2f}x faster; own blocks "
                      f"{replay / own:.2f}x faster than the model's modules with replay; shared prefix stems "
                      f"{whole / own:.2f}x faster than whole prefixes")
        print(f"\n## target values z, one chunk of facts ({args.repeats} interleaved repeats)")
        print_table(rows)

    if not args.skip_eval:
        records = requests[: args.eval_records]
        scores = {}
        variants = scoring_variants(model, tokenizer, records, scores)
        times = interleaved(variants, args.repeats)
        base = scores["batched"]
        print(f"\n## CounterFact scoring of {len(records)} records ({len(base)} prompts, 2 targets each)")
        print_table([{"variant": name, "median s": median(values), "runs s": runs(values),
                      "records/s": len(records) / median(values),
                      "batched is x faster": median(values) / median(times["batched"]),
                      "max |nll - batched nll|": nll_gap(scores, name)}
                     for name, values in times.items()])


if __name__ == "__main__":
    main()
