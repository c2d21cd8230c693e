"""End-to-end edits per second of MEMIT and EMMET (targets + keys + solve + update) at batch sizes N.

    python bench/edit_throughput.py                       # N = 16, 256, 1024 on the toy-world model
    python bench/edit_throughput.py --sizes 16,256 --quick
    python bench/edit_throughput.py --shapes llama3-8b --device cuda --model-dtype bfloat16 --layers 4,5,6,7,8
"""

from __future__ import annotations

import time


from common import base_parser, load_bench, print_table, setup, synchronize, take_requests
from editlib.editing.editor import Editor
from editlib.methods.hparams import make_hparams
from editlib.methods.hparams import MEMIT_LENGTHS
from editlib.editing.templates import sample_context_templates


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,256,1024")
    parser.add_argument("--methods", default="memit,emmet")
    parser.add_argument("--layers", default="1,2")
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.quick:
        sizes = [min(s, 64) for s in sizes]
    setup(args)
    bench = load_bench(args)
    layers = tuple(int(x) for x in args.layers.split(","))
    requests = take_requests(bench, max(sizes))
    # C from the bench corpus for each edited layer (one pass)
    from editlib.model.layout import model_layout
    from editlib.editing.statistics import StatsConfig, collect_second_moments

    layout = model_layout(bench.model)
    moments = collect_second_moments(bench.model, bench.tokenizer, layout, list(layers), bench.texts[:512],
                                     StatsConfig(max_length=256), progress=False)
    covariances = {layer: m.mean for layer, m in moments.items()}
    templates = sample_context_templates(bench.model, bench.tokenizer, MEMIT_LENGTHS, 0)
    print(f"# {bench.source}; layers {layers}")
    rows = []
    for method in args.methods.split(","):
        hp = make_hparams(method, layers=layers, targets={"v_num_grad_steps": args.steps, "facts_per_chunk": 64})
        for n in sizes:
            # a new session per size: no z reused from a smaller N (and no on-disk target store)
            editor = Editor(bench.model, bench.tokenizer, hp, covariances, templates, progress=False)
            start = time.perf_counter()
            editor.apply(requests[:n])
            synchronize()
            seconds = time.perf_counter() - start
            editor.restore()
            rows.append({"method": method, "N": n, "seconds": seconds, "edits/s": n / seconds})
    print_table(rows)


if __name__ == "__main__":
    main()
