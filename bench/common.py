"""Shared pieces of the speed benchmarks: the benchmark model, requests, interleaved timing, tables,
and what `bench/run.py` hands each standing benchmark (`Context`, `result_row`, `Skip`).

The model is the toy-world Llama (editlib.toy.world + editlib.toy.pretrain) with 6 layers, trained once
and cached under a content-keyed folder (world config + train config); if those modules are not
importable, a randomly initialised tiny Llama with a locally trained BPE tokenizer stands in.

Timing: the variants being compared run alternately in the same process on the same model
(A, B, A, B, ...), `repeats` times each, and ratios are ratios of medians. The machine is shared,
so single timings are noisy; interleaving makes slow phases hit both variants alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from editlib.io import content_key
from editlib.data.records import EditRequest
from editlib.toy.pinned import machine

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("EDITLIB_BENCH_CACHE", "/tmp/editlib-bench-cache"))
# SmolLM2-135M-Instruct and its records and tasks as configs/smollm2.yaml's prepare rules write them
SMOLLM2_DIR = ROOT / "resources" / "smollm2" / "SmolLM2-135M-Instruct"
SMOLLM2_CONFIG = ROOT / "configs" / "smollm2.yaml"

# Toy world large enough for 1024 distinct CounterFact records (one per edit-pool subject fact).
WORLD = {"seed": 0, "n_subjects": 1100}
# 6 layers (for a 6-layer statistics sweep), hidden 128, intermediate 4x.
TRAIN = {"layers": 6, "hidden": 128, "intermediate": 512, "heads": 4, "vocab_size": 2048, "steps": 1200}
# Random-weight models of these shapes (`--shapes`); "bench" is the toy model's width and depth.
SHAPES = {
    "bench": {"hidden_size": TRAIN["hidden"], "intermediate_size": TRAIN["intermediate"],
              "num_hidden_layers": TRAIN["layers"], "num_attention_heads": TRAIN["heads"],
              "num_key_value_heads": TRAIN["heads"]},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "rope_theta": 500000.0},
}


# ----------------------------------------------------------------------------- command line


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 repeats (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (interleaved)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="toy world + model cache")
    parser.add_argument("--random-model", action="store_true",
                        help="skip the toy world: random-weight Llama + locally trained tokenizer")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="bench",
                        help="shapes of the random-weight model (llama3-8b implies --random-model; needs a GPU)")
    parser.add_argument("--model-layers", type=int, default=None, help="depth of the random-weight model")
    parser.add_argument("--device", default="cpu", help="e.g. cuda")
    parser.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parser


def add_prepared_smollm2_arguments(parser: argparse.ArgumentParser) -> None:
    """--model-dir and --records: a SmolLM2 folder and its records as the DAG prepares them."""
    parser.add_argument("--model-dir", required=True, help="a prepared SmolLM2 folder (rule prepare_model)")
    parser.add_argument("--records", required=True, help="its records.json (rule prepare_data)")


def setup(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine_line(args.threads))


def machine_line(threads: int) -> str:
    cpu = machine()["cpu"]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    import transformers

    return (f"# machine: nproc={os.cpu_count()} cpu={cpu!r} loadavg={load} | python {platform.python_version()} "
            f"torch {torch.__version__} transformers {transformers.__version__} | torch threads={threads}")


# ----------------------------------------------------------------------------- standing benchmarks (bench/run.py)


class Skip(Exception):
    """A standing benchmark cannot run on this machine; the message says why and how to fix it."""


def result_row(benchmark: str, case: str, ours: str, baseline: str, ours_s: float, baseline_s: float,
               check: str = "") -> dict:
    """One row of bench/results.csv: `ours` against `baseline` on `case`, medians in seconds;
    ratio = baseline_s / ours_s (above 1: ours is faster). `check` says how far their results agree."""
    return {"benchmark": benchmark, "case": case, "ours": ours, "baseline": baseline, "ours_s": float(ours_s),
            "baseline_s": float(baseline_s), "ratio": float(baseline_s) / float(ours_s), "check": check}


class Context:
    """What the standing benchmarks share in one `bench/run.py` process: torch threads, the toy
    bench model (trained once and cached under `cache_dir`), and SmolLM2 loaded once from
    `smollm2_dir` (a `Skip` when the prepare rules have not written it)."""

    def __init__(self, threads: int = 2, cache_dir: Path = DEFAULT_CACHE, smollm2_dir: Path = SMOLLM2_DIR):
        self.threads, self.cache_dir, self.smollm2_dir = threads, Path(cache_dir), Path(smollm2_dir)
        self._toy = None
        self._smollm2 = None

    def args(self, *argv: str) -> argparse.Namespace:
        """The benchmark scripts' command-line defaults, as `base_parser` gives them."""
        return base_parser("").parse_args(["--threads", str(self.threads), "--cache-dir", str(self.cache_dir), *argv])

    def toy_bench(self) -> Bench:
        if self._toy is None:
            self._toy = load_bench(self.args())
        return self._toy

    def random_bench(self, layers: int) -> Bench:
        """A random-weight Llama of the toy model's width and `layers` deep (not kept)."""
        return load_bench(self.args("--random-model", "--model-layers", str(layers)))

    def _smollm2_path(self, relative: str) -> Path:
        def shown(path: Path) -> Path:
            return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path

        path = self.smollm2_dir / relative
        if not path.exists():
            target = self.smollm2_dir / ("model" if relative == "model" else "data/records.json")
            raise Skip(f"no {shown(path)} (SmolLM2 and its records and tasks come from `.venv/bin/snakemake "
                       f"--configfile configs/smollm2.yaml --cores all {shown(target)}`)")
        return path

    def smollm2(self):
        """(model, tokenizer) of the prepared SmolLM2-135M-Instruct, fp32 on CPU."""
        model_dir = self._smollm2_path("model")
        if self._smollm2 is None:
            from editlib.model.loading import load_model

            self._smollm2 = load_model(str(model_dir))
        return self._smollm2

    def smollm2_records(self) -> Path:
        return self._smollm2_path("data/records.json")

    def smollm2_tasks(self) -> Path:
        return self._smollm2_path("data/tasks")


# ----------------------------------------------------------------------------- model and data


@dataclasses.dataclass
class Bench:
    """The benchmark model, its tokenizer, edit requests and a statistics corpus."""

    model: torch.nn.Module
    tokenizer: object
    requests: list[EditRequest]
    texts: list[str]
    source: str


def load_bench(args: argparse.Namespace) -> Bench:
    """The toy-world model (trained and cached on first use), else a random-weight Llama, on
    `args.device` in `args.model_dtype`."""
    bench = None
    if not args.random_model and args.shapes == "bench":
        try:
            bench = _toy_world_bench(Path(args.cache_dir))
        except ImportError as err:
            print(f"# toy world unavailable ({err}); using a random-weight tiny Llama", file=sys.stderr)
    if bench is None:
        shapes = dict(SHAPES[args.shapes])
        if args.model_layers:
            shapes["num_hidden_layers"] = args.model_layers
        bench = _random_bench(shapes, args.shapes, args.device)
    bench.model.to(device=args.device, dtype=getattr(torch, args.model_dtype))
    bench.source += f"; {args.model_dtype} on {args.device}"
    return bench


def _toy_world_bench(cache_dir: Path) -> Bench:
    from transformers import AutoModelForCausalLM

    from editlib.model.loading import load_tokenizer

    from editlib.toy.pretrain import RecallError, TrainConfig, train_model
    from editlib.data.records import load_requests
    from editlib.toy.world import WORLD_FORMAT, build_world

    key = content_key({"world": WORLD, "world_format": WORLD_FORMAT, "train": TRAIN})
    root = cache_dir / f"toy-{key}"
    world_dir, model_dir = root / "world", root / "model"
    if not (world_dir / "world.json").exists():
        print(f"# building toy world in {world_dir}", file=sys.stderr)
        build_world(world_dir, **WORLD)
    if not (model_dir / "recall.json").exists():
        print(f"# training the toy-world model into {model_dir} (one-off, a few minutes)", file=sys.stderr)
        try:
            train_model(world_dir, model_dir, TrainConfig(**TRAIN))
        except RecallError as err:  # saved anyway; speed does not depend on recall
            print(f"# warning: {err}", file=sys.stderr)
    recall = json.loads((model_dir / "recall.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    tokenizer = load_tokenizer(str(model_dir))
    tokenizer.padding_side = "right"
    requests = load_requests(world_dir / "counterfact.json")
    texts = [json.loads(line)["text"] for line in (world_dir / "wiki.jsonl").read_text().splitlines() if line.strip()]
    source = (f"toy world {key} ({len(requests)} CounterFact records, {len(texts)} wiki docs); "
              f"model {TRAIN['layers']}L h{TRAIN['hidden']} ff{TRAIN['intermediate']} "
              f"recall_edit={recall.get('recall_edit', float('nan')):.3f}")
    return Bench(model, tokenizer, requests, texts, source)


def _random_bench(shapes: dict, label: str, device: str = "cpu") -> Bench:
    from transformers import LlamaConfig, LlamaForCausalLM

    from editlib.toy.vocab import train_bpe_tokenizer

    names = [f"{a}{b}{c}" for a in ("Ka", "Lo", "Mi", "Ne", "Su", "Ta", "Vo", "Ze") for b in ("ran", "del", "bis", "tor")
             for c in ("", "us", "an", "el", "is", "or", "im", "ax")]  # 256 names x 4 relations = 1024 requests
    relations = [("The mother tongue of {} is", ["French", "English", "Dutch", "Spanish"]),
                 ("{} is a citizen of", ["France", "Spain", "Italy", "Japan"]),
                 ("{} plays the", ["piano", "guitar", "violin", "drums"]),
                 ("{} was born in", ["Paris", "Rome", "Berlin", "Tokyo"])]
    rng = random.Random(0)
    sentences = [f"{p.format(rng.choice(names))} {rng.choice(objs)}." for _ in range(3000)
                 for p, objs in [rng.choice(relations)]]
    texts = [" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6)]
    tokenizer = train_bpe_tokenizer(sentences, vocab_size=1024, add_bos=True)
    torch.manual_seed(0)
    # token ids stay below the tokenizer's size; a larger vocab_size (llama3-8b) only widens the head
    fields = {"vocab_size": len(tokenizer), "max_position_embeddings": 512, "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
              "tie_word_embeddings": False, **shapes}
    config = LlamaConfig(**fields)
    with torch.device(device):  # initialised where it runs (8B parameters do not fit a CI machine)
        model = LlamaForCausalLM(config).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    requests = []
    for i in range(len(names) * len(relations)):
        prompt, objects = relations[i % len(relations)]
        subject = names[i // len(relations)]
        true, new = rng.sample(objects, 2)
        requests.append(EditRequest(case_id=i, prompt=prompt, subject=subject, target_new=new, target_true=true,
                                    paraphrase_prompts=(f"Some say that {prompt.format(subject)}",),
                                    neighborhood_prompts=(prompt.format(names[(i + 3) % len(names)]),)))
    return Bench(model, tokenizer, requests, texts, f"random-weight Llama, {label} shapes: {config.num_hidden_layers}L "
                 f"h{config.hidden_size} ff{config.intermediate_size} vocab {config.vocab_size} "
                 f"({len(requests)} synthetic requests)")


def take_requests(bench: Bench, n: int) -> list[EditRequest]:
    if n > len(bench.requests):
        raise SystemExit(f"asked for {n} requests but the benchmark data has {len(bench.requests)}")
    return bench.requests[:n]


def built_upper_blocks(fn) -> list:
    """Every `editlib.model.upper_blocks.UpperBlocks` that `fn` builds, in order (one per chunk of facts;
    each holds its chunk's token layout and its blocks' key/value buffers)."""
    from editlib.model import upper_blocks

    seen = []
    original = upper_blocks.UpperBlocks.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self)
    upper_blocks.UpperBlocks.__init__ = record
    try:
        fn()
    finally:
        upper_blocks.UpperBlocks.__init__ = original
    return seen


# ----------------------------------------------------------------------------- timing


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: bool = True,
                rotate: bool = False) -> dict[str, list[float]]:
    """Run each variant `repeats` times, alternating between variants; seconds per run.

    With `warmup`, every variant runs once untimed first (allocator, first-call overheads). With
    `rotate`, each round starts one variant later than the one before (A B C, B C A, C A B, ...),
    so that no variant always runs right after the same other one.
    """
    names = list(variants)
    if warmup:
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name]()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def paired(first, second, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of `first` and `second` (`interleaved`, rotating: A B, B A, A B, ...)."""
    times = interleaved({"first": first, "second": second}, repeats, rotate=True)
    return times["first"], times["second"]


def synchronize() -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def item_agreement(first: dict, second: dict) -> tuple[dict, int, float, int]:
    """How two lm-eval results of the same multiple-choice requests (``log_samples=True``) agree:
    (second's items by (task, doc_id), the number of items, the largest difference between the two
    log-likelihoods of any choice, the number of items whose prediction differs)."""
    from editlib.eval.downstream import item_rows

    a, b = ({(row["task"], row["doc_id"]): row for row in item_rows(result)} for result in (first, second))
    gap = max(abs(x - y) for key in b for x, y in zip(a[key]["loglikelihoods"], b[key]["loglikelihoods"]))
    flipped = sum(a[key]["prediction"] != b[key]["prediction"] for key in b)
    return b, len(b), gap, flipped


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def print_table(rows: list[dict], columns: Sequence[str] | None = None) -> None:
    """A plain aligned table (markdown pipe syntax, so it pastes into docs)."""
    if not rows:
        return
    columns = list(columns or rows[0].keys())

    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
        return str(value)

    cells = [[fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def runs(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)
