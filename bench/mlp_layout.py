"""The own upper blocks' MLP token-major or weight-major on SmolLM2: the MLP alone, and target values z.

`editlib.model.upper_blocks` runs the MLP's products weight-major, (2I, d) @ (d, N), for token counts
N in `MLP_WEIGHT_MAJOR_TOKENS`, token-major, (N, d) @ (d, 2I), otherwise. Two measurements, each
alternating the two layouts in one process:
- "MLP alone": the MLP's products and element-wise work, forward and backward, through the prepared
  weights of every block above MEMIT's layer, for N tokens (random activations), token-major vs
  weight-major;
- "z": `optimize_targets` at MEMIT's hook (a block output, 6 templates, 25 steps, early stop off)
  for chunks of the first k facts, with the window as configured against token-major throughout
  (the window emptied), and the largest difference between the two results' values.

    python bench/mlp_layout.py --model-dir resources/smollm2/SmolLM2-135M-Instruct/model \
        --records resources/smollm2/SmolLM2-135M-Instruct/data/records.json

`make bench` (bench/run.py) runs `standing`: the MLP alone at five token counts (needs no records).
"""

from __future__ import annotations

import dataclasses
import statistics

import torch

from common import (add_prepared_smollm2_arguments, base_parser, built_upper_blocks, median, paired, print_table,
                    result_row, runs, setup)

from editlib.model import upper_blocks
from editlib.editing.hparams import MEMIT_LENGTHS
from editlib.model.loading import load_model
from editlib.model.layout import model_layout
from editlib.data.records import load_requests
from editlib.editing.templates import sample_context_templates
from editlib.editing.values import TargetHparams, optimize_targets


def mlp_pass(weights: list, x: torch.Tensor, grad: torch.Tensor, weight_major: bool) -> None:
    """The MLP of every block in `weights`, forward and backward, as `upper_blocks` runs it."""
    for block in weights:
        _, gate, up, silu = upper_blocks.mlp_forward(block, x, x, weight_major)
        upper_blocks.mlp_backward(block, grad, gate, up, silu, weight_major)


def continuation_tokens(fn) -> int:
    """The number of tokens the upper blocks run per step in `fn` (the N of their products)."""
    return len(built_upper_blocks(fn)[0].token_row)


def standing(ctx, tokens: tuple[int, ...] = (13, 32, 128, 416, 700), pairs: int = 8,
             memit_layer: int = 6) -> list[dict]:
    """bench/run.py: the MLP of every block above MEMIT's layer of SmolLM2, forward and backward, at
    each token count, in the layout `upper_blocks` picks for it (weight-major inside
    MLP_WEIGHT_MAJOR_TOKENS) against the other one, `pairs` pairs each."""
    model, _ = ctx.smollm2()
    layout = model_layout(model)
    window = upper_blocks.MLP_WEIGHT_MAJOR_TOKENS
    first = memit_layer + 1
    weights = [upper_blocks._prepared(model, index) for index in range(first, layout.n_layers)]
    rows = []
    for n in tokens:
        x, grad = torch.randn(n, model.config.hidden_size), torch.randn(n, model.config.hidden_size)
        token_major, weight_major = paired(lambda: mlp_pass(weights, x, grad, False),
                                           lambda: mlp_pass(weights, x, grad, True), pairs)
        ours, other = (weight_major, token_major) if n in window else (token_major, weight_major)
        names = ("weight-major (W @ x^T)", "token-major (x @ W^T)")
        ours_name, other_name = names if n in window else names[::-1]
        ratios = sorted(b / a for a, b in zip(ours, other))
        rows.append(result_row("mlp_layout", f"SmolLM2's MLP, forward and backward, {n} tokens, blocks "
                               f"{first}-{layout.n_layers - 1}", f"{ours_name}, as upper_blocks runs {n} tokens",
                               other_name, median(ours), median(other),
                               f"{pairs} pairs, ratios {ratios[0]:.2f}-{ratios[-1]:.2f}"))
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    add_prepared_smollm2_arguments(parser)
    parser.add_argument("--tokens", default="13,16,24,32,64,128,256,416,512,700",
                        help="token counts for the MLP alone")
    parser.add_argument("--facts", default="1,4,8,32", help="chunk sizes (facts) for z")
    parser.add_argument("--memit-layer", type=int, default=6)
    parser.add_argument("--mlp-repeats", type=int, default=12)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.facts, args.repeats, args.mlp_repeats = "13,64", "2", 1, 2
    setup(args)
    model, tokenizer = load_model(args.model_dir)
    layout = model_layout(model)
    window = upper_blocks.MLP_WEIGHT_MAJOR_TOKENS
    print(f"# MLP_WEIGHT_MAJOR_TOKENS = {window}")
    weights = [upper_blocks._prepared(model, index) for index in range(args.memit_layer + 1, layout.n_layers)]

    rows = []
    for tokens in (int(n) for n in args.tokens.split(",") if n):
        x, grad = torch.randn(tokens, model.config.hidden_size), torch.randn(tokens, model.config.hidden_size)
        token_major, weight_major = paired(lambda: mlp_pass(weights, x, grad, False),
                                           lambda: mlp_pass(weights, x, grad, True), args.mlp_repeats)
        ratios = sorted(a / b for a, b in zip(token_major, weight_major))
        rows.append({"tokens": tokens, "in window": tokens in window, "token-major ms": 1e3 * median(token_major),
                     "weight-major ms": 1e3 * median(weight_major),
                     "token-major / weight-major, median of pairs": statistics.median(ratios),
                     "range of pairs": f"{ratios[0]:.3f}-{ratios[-1]:.3f}"})
    if rows:
        print(f"\n## MLP alone, forward and backward through {len(weights)} blocks ({args.mlp_repeats} pairs)")
        print_table(rows)

    requests = load_requests(args.records)
    templates = sample_context_templates(model, tokenizer, MEMIT_LENGTHS, 0)
    module = layout.block(args.memit_layer)
    rows = []
    for n_facts in (int(n) for n in args.facts.split(",") if n):
        hp = TargetHparams(v_num_grad_steps=25, early_stop_loss=0.0, facts_per_chunk=n_facts)
        results = {}

        def z(name: str, tokens: range):
            def run():
                upper_blocks.MLP_WEIGHT_MAJOR_TOKENS = tokens
                try:
                    results[name] = optimize_targets(model, tokenizer, requests[:n_facts], templates, module, hp,
                                                     progress=False)
                finally:
                    upper_blocks.MLP_WEIGHT_MAJOR_TOKENS = window
            return run

        as_configured, token_major = paired(z("as configured", window), z("token-major", range(0)), args.repeats)
        rows.append({"facts": n_facts, "tokens": continuation_tokens(lambda: optimize_targets(
                         model, tokenizer, requests[:n_facts], templates, module,
                         dataclasses.replace(hp, v_num_grad_steps=1), progress=False)),
                     "as configured s": median(as_configured), "runs s": runs(as_configured),
                     "token-major s": median(token_major), "token-major runs s": runs(token_major),
                     "token-major / as configured": median(token_major) / median(as_configured),
                     "max |z diff|": float((results["as configured"].values
                                            - results["token-major"].values).abs().max())})
    if rows:
        print(f"\n## z at layer {args.memit_layer}'s block output, 25 steps ({args.repeats} interleaved repeats; "
              "a chunk whose tokens are outside the window runs the same code both ways)")
        print_table(rows)


if __name__ == "__main__":
    main()
