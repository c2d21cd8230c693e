"""The own upper blocks' keys and values positions-last or positions-second-last: attention's products on SmolLM2.

`editlib.model.upper_blocks` keeps each block's keys and values laid out (R, K, D, P + T), positions
last. This times the four batched products of attention that read those buffers, per block and
as the blocks run them (scores and attended values forward; the gradients at the attention
probabilities and at the queries backward), on the chunks z runs at MEMIT's and ROME's hooks:
the blocks' own buffers against copies laid out (R, K, P + T, D). Between two blocks runs that
block's gate/up product (as z runs it at these token counts), which moves 9 MB of weights and
activations through the caches as a step does; a third variant runs that product alone, and
"attention" is a pass less its median. Variants take turns, the first of each round rotating.

    python bench/attention_layout.py --model-dir resources/smollm2/SmolLM2-135M-Instruct/model \
        --records resources/smollm2/SmolLM2-135M-Instruct/data/records.json

`make bench` (bench/run.py) runs `standing`: MEMIT's chunk only.
"""

from __future__ import annotations

import torch

from common import (add_prepared_smollm2_arguments, base_parser, built_upper_blocks, interleaved, median, print_table,
                    result_row, setup)

from editlib.model import upper_blocks
from editlib.editing.hparams import MEMIT_LENGTHS, ROME_LENGTHS
from editlib.model.loading import load_model
from editlib.model.layout import model_layout
from editlib.data.records import load_requests
from editlib.editing.templates import sample_context_templates
from editlib.editing.values import TargetHparams, optimize_targets


def attention_passes(chunk: upper_blocks.UpperBlocks) -> dict:
    """Three passes over the chunk's blocks: attention's products on the blocks' own buffers
    (positions last), on (R, K, P + T, D) copies, and the gate/up products between them alone."""
    rows, kv_heads, dim, width = chunk.blocks[0].keys.shape
    queries = chunk.heads // chunk.kv_heads * chunk.length
    query, grad_attended = torch.randn(rows, kv_heads, queries, dim), torch.randn(rows, kv_heads, queries, dim)
    probs = torch.softmax(torch.randn(rows, kv_heads, queries, width), dim=-1)
    grad_scores = torch.randn(rows, kv_heads, queries, width)
    activations = torch.randn(len(chunk.token_row), chunk.blocks[0].gate_up.shape[1])
    last = [(b.gate_up, b.keys, b.values) for b in chunk.blocks]
    second_last = [(w, k.transpose(-1, -2).contiguous(), v.transpose(-1, -2).contiguous()) for w, k, v in last]

    def positions_last():
        for gate_up, keys, values in last:
            gate_up @ activations.T
            query @ keys, probs @ values.transpose(-1, -2), grad_attended @ values, grad_scores @ keys.transpose(-1, -2)

    def positions_second_last():
        for gate_up, keys, values in second_last:
            gate_up @ activations.T
            query @ keys.transpose(-1, -2), probs @ values, grad_attended @ values.transpose(-1, -2), grad_scores @ keys

    def gate_up_alone():
        for gate_up, _, _ in last:
            gate_up @ activations.T
    shape = f"{rows}x{kv_heads} of ({queries}, {dim}) x ({dim}, {width})"
    return shape, {"positions last": positions_last, "positions second-last": positions_second_last,
                   "gate/up alone": gate_up_alone}


def chunk_of(model, tokenizer, requests, module, lengths, n_facts: int) -> upper_blocks.UpperBlocks:
    """The upper blocks (with their key/value buffers) that z builds for the first `n_facts` facts."""
    templates = sample_context_templates(model, tokenizer, lengths, 0)
    hp = TargetHparams(v_num_grad_steps=1, early_stop_loss=0.0, facts_per_chunk=n_facts)
    return built_upper_blocks(lambda: optimize_targets(model, tokenizer, requests[:n_facts], templates, module, hp,
                                                       progress=False))[0]


def per_block_seconds(chunk: upper_blocks.UpperBlocks, rounds: int) -> tuple[str, dict]:
    """The batch of products, and seconds per block of attention's products in each layout (the
    gate/up products between blocks subtracted; "gate/up alone" that product's own)."""
    shape, variants = attention_passes(chunk)
    times = interleaved(variants, rounds, rotate=True)
    alone = median(times["gate/up alone"])
    seconds = {name: (median(times[name]) - alone) / len(chunk.blocks)
               for name in ("positions last", "positions second-last")}
    return shape, {**seconds, "gate/up alone": alone / len(chunk.blocks)}


def standing(ctx, memit_layer: int = 6, facts: int = 32, rounds: int = 30) -> list[dict]:
    """bench/run.py: attention's products per block on MEMIT's chunk of SmolLM2, positions last
    (as upper_blocks lays out its keys and values) against positions second-last."""
    model, tokenizer = ctx.smollm2()
    requests = load_requests(ctx.smollm2_records())
    chunk = chunk_of(model, tokenizer, requests, model_layout(model).block(memit_layer), MEMIT_LENGTHS, facts)
    shape, seconds = per_block_seconds(chunk, rounds)
    return [result_row("attention_layout", f"attention's 4 batched products per block, MEMIT's chunk of {facts} "
                       f"facts on SmolLM2 ({shape})", "keys/values (R, K, D, P+T), positions last",
                       "(R, K, P+T, D), positions second-last", seconds["positions last"],
                       seconds["positions second-last"], f"{rounds} rounds; gate/up product between blocks subtracted")]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    add_prepared_smollm2_arguments(parser)
    parser.add_argument("--memit-layer", type=int, default=6)
    parser.add_argument("--rome-layer", type=int, default=4)
    parser.add_argument("--memit-facts", type=int, default=32)
    parser.add_argument("--rome-facts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=30, help="rounds of the three passes")
    args = parser.parse_args()
    if args.quick:
        args.memit_facts, args.rome_facts, args.rounds = 4, 2, 3
    setup(args)
    model, tokenizer = load_model(args.model_dir)
    layout = model_layout(model)
    requests = load_requests(args.records)
    cases = [(f"MEMIT, layer {args.memit_layer} block output", layout.block(args.memit_layer), MEMIT_LENGTHS,
              args.memit_facts),
             (f"ROME, layer {args.rome_layer} MLP output", layout.mlp(args.rome_layer), ROME_LENGTHS, args.rome_facts)]
    rows = []
    for label, module, lengths, n_facts in cases:
        chunk = chunk_of(model, tokenizer, requests, module, lengths, n_facts)
        shape, seconds = per_block_seconds(chunk, args.rounds)
        last, second_last = seconds["positions last"], seconds["positions second-last"]
        blocks = len(chunk.blocks)
        rows.append({"hook": label, "facts": n_facts, "blocks": blocks, "products (batch of matrices)": shape,
                     "positions last ms per block": 1e3 * last,
                     "positions second-last ms per block": 1e3 * second_last,
                     "second-last / last": second_last / last,
                     "gate/up alone ms per block": 1e3 * seconds["gate/up alone"]})
    print(f"\n## attention's four batched products per block, {args.rounds} rounds (medians; the gate/up "
          "product between blocks subtracted)")
    print_table(rows)


if __name__ == "__main__":
    main()
