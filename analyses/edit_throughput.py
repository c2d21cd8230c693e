"""End-to-end edits per second of MEMIT and EMMET (targets + keys + solve + update) at batch sizes N.

What it shows: how edits/s scales with the batch size N on the bench model of bench/common.py (on CPU
it is flat in N, since the time is almost all target optimisation; the solves are small at
d_k = 512). An absolute rate with no baseline, so not one of `make bench`'s ratios. Run from the
repository root (about 10 minutes on 2 cores at the default sizes):

    python analyses/edit_throughput.py                       # N = 16, 256, 1024 on the toy-world model
    python analyses/edit_throughput.py --sizes 16,256 --quick
    python analyses/edit_throughput.py --shapes llama3-8b --device cuda --model-dtype bfloat16 --layers 4,5,6,7,8
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "bench"), str(Path(__file__).resolve().parents[1])]

from common import base_parser, load_bench, print_table, setup, synchronize, take_requests  # noqa: E402
from editlib.editing.editor import Editor  # noqa: E402
from editlib.editing.hparams import MEMIT_LENGTHS  # noqa: E402
from editlib.methods.registry import make_hparams
from editlib.editing.templates import sample_context_templates  # noqa: E402


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
