"""GRACE edits on SmolLM2-135M: training above the edited block against whole-model steps.

Each variant edits the same facts into a fresh codebook at the config's GRACE layer (n_iter Adam
steps per edit, replace_last), in batches of each of `--batch-sizes` (1: one edit at a time, the sequential
b=1 run): "own blocks" (the default: each prompt before its query token runs once into a cache,
every step runs only the blocks above the edited one, at the query and target tokens) and "whole
model" (every step a forward pass of the whole model through GRACE's hooks). Variants alternate
(bench/common.py); the ratio is of medians. Both reach the same first-step loss and a near-zero
target NLL (printed: the mean after each edit); the values themselves drift apart over 50 steps
(float rounding amplified by Adam at lr 1 once the gradient is tiny), which is why
tests/test_grace.py checks the two paths' equality over a few steps.
At batch size 1 a step multiplies a couple of token rows by every weight matrix above the edited
layer, forward and backward: it is bound by reading those weights from memory, not by FLOPs.

    python bench/grace_training.py --model-dir resources/smollm2/SmolLM2-135M-Instruct/model \
        --records resources/smollm2/SmolLM2-135M-Instruct/data/records.json

`make bench` (bench/run.py) runs `standing`: 4 facts at the config's GRACE layer, in batches of 1 and 4.
"""

from __future__ import annotations

import yaml

from common import SMOLLM2_CONFIG, base_parser, interleaved, median, print_table, result_row, setup
from editlib.methods.grace.session import GraceEditor
from editlib.methods.grace import GraceHparams
from editlib.model.loading import load_model
from editlib.model.layout import model_layout
from editlib.data.records import batches, load_requests


def compare(model, tokenizer, module: str, requests, hparams: GraceHparams, size: int,
            repeats: int) -> tuple[dict, dict]:
    """Seconds of editing `requests` in batches of `size` with the own blocks and with whole-model
    steps (interleaved), and each way's final target NLL per edit."""
    final_nll = {}

    def run(own_blocks: bool, label: str):
        def edit():
            editor = GraceEditor(model, tokenizer, module, hparams, own_blocks=own_blocks)
            try:
                final_nll[label] = [nll for batch in batches(requests, size) for nll in editor.edit(batch)["nll_final"]]
            finally:
                editor.remove()
        return edit

    times = interleaved({"own blocks": run(True, "own blocks"), "whole model": run(False, "whole model")},
                        repeats, warmup=False)
    return times, final_nll


def standing(ctx, facts: int = 4, batch_sizes: tuple[int, ...] = (1, 4), n_iter: int | None = None) -> list[dict]:
    """bench/run.py: GRACE edits of `facts` facts on SmolLM2 at configs/smollm2.yaml's GRACE layer
    and n_iter (or `n_iter`), in batches of each of `batch_sizes`, one run of each way."""
    model, tokenizer = ctx.smollm2()
    grace = yaml.safe_load(SMOLLM2_CONFIG.read_text())["methods"]["grace"]
    module = model_layout(model).rewrite(grace["layers"][0])
    requests = load_requests(ctx.smollm2_records())[:facts]
    hparams = GraceHparams(n_iter=n_iter or grace["n_iter"])
    rows = []
    for size in batch_sizes:
        times, nll = compare(model, tokenizer, module, requests, hparams, size, 1)
        rows.append(result_row("grace_training", f"GRACE, {facts} edits in batches of {size}, {hparams.n_iter} steps "
                               f"each, SmolLM2-135M at {module}",
                               "cached prefix, only the blocks above the edited one (own blocks)",
                               "a whole-model forward and backward per step", median(times["own blocks"]),
                               median(times["whole model"]),
                               f"mean final target NLL {sum(nll['own blocks']) / facts:.2g} vs "
                               f"{sum(nll['whole model']) / facts:.2g}"))
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="a prepared SmolLM2 folder (rule prepare_model)")
    parser.add_argument("--records", required=True, help="its records.json (rule prepare_data)")
    parser.add_argument("--facts", type=int, default=8)
    parser.add_argument("--layer", type=int, default=6, help="GRACE layer (configs/smollm2.yaml: 6)")
    parser.add_argument("--n-iter", type=int, default=50)
    parser.add_argument("--batch-sizes", default="1,8")
    args = parser.parse_args()
    if args.quick:
        args.facts, args.n_iter, args.repeats = 2, 5, 1
    setup(args)
    model, tokenizer = load_model(args.model_dir)
    module = model_layout(model).rewrite(args.layer)
    requests = load_requests(args.records)[: args.facts]
    hparams = GraceHparams(n_iter=args.n_iter)
    print(f"# SmolLM2-135M-Instruct fp32 on cpu; GRACE at {module}, {args.facts} facts, n_iter {args.n_iter}")
    rows = []
    for size in (int(b) for b in args.batch_sizes.split(",")):
        times, final_nll = compare(model, tokenizer, module, requests, hparams, size, args.repeats)
        rows.append({"batch size": size, "own blocks s/edit": median(times["own blocks"]) / args.facts,
                     "whole model s/edit": median(times["whole model"]) / args.facts,
                     "speed-up": median(times["whole model"]) / median(times["own blocks"]),
                     "final NLL, own blocks": sum(final_nll["own blocks"]) / args.facts,
                     "final NLL, whole model": sum(final_nll["whole model"]) / args.facts})
    print_table(rows)


if __name__ == "__main__":
    main()
