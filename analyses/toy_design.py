"""Why the default toy model looks the way it does: train toy-world variants, trace them, edit them.

For each variant: build the world, train the model, then report its recall, the average indirect
effect of restoring the hidden state at the subject's token after layer 0 as a fraction of the
whole corruption effect (causal tracing over the facts it knows), and ROME's single-edit ES / PS /
NS at its best layer (64 facts, ROME's paper hyperparameters, as in config.yaml).

What it shows: the design choices of the default toy model (docs/toy_model.md), each variant's
recall, where its facts live, and how editable it is. Run from the repository root:

    python analyses/toy_design.py                    # all variants, about 25 minutes on 2 cores
    python analyses/toy_design.py --variants default

Variants (each adds one change to the previous one):
  plain      4-layer Llama, two-word names, one sentence per fact and template (the first default)
  profiles   + one-word names and "Name obj1 obj2 ..." profile lines
  local      + layers 0-1 attend only to their own token (window 1)
  default    + layers 2-4 attention-only (no MLP): config.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editlib.data.corpus import load_corpus  # noqa: E402
from editlib.study.experiments import ExperimentContext, single_edits  # noqa: E402
from editlib.methods.registry import make_hparams  # noqa: E402
from editlib.model.loading import load_model  # noqa: E402
from editlib.model.layout import model_layout
from editlib.toy.pretrain import TrainConfig, train_model  # noqa: E402
from editlib.data.records import load_requests  # noqa: E402
from editlib.editing.statistics import StatsConfig, collect_second_moments  # noqa: E402
from editlib.toy.world import build_world  # noqa: E402
from editlib.eval.known_facts import known_facts  # noqa: E402
from editlib.eval.tracing import TracingConfig, trace_facts  # noqa: E402

WORLD = {"seed": 0, "n_subjects": 450, "edit_fraction": 0.6667, "facts_per_edit_subject": 4}
ONE_WORD = {"name_scheme": "single", "profiles_per_subject": 4}
TRAIN = {"steps": 3000, "lr": 2e-3, "vocab_size": 3500, "recall_threshold": 0.0}
VARIANTS = {
    "plain": (WORLD, {**TRAIN, "layers": 4}),
    "profiles": ({**WORLD, **ONE_WORD}, {**TRAIN, "layers": 4}),
    "local": ({**WORLD, **ONE_WORD}, {**TRAIN, "layers": 5, "local_layers": 2, "local_window": 1}),
    "default": ({**WORLD, **ONE_WORD}, {**TRAIN, "layers": 5, "local_layers": 2, "local_window": 1, "mlp_layers": 2}),
}


def evaluate(root: Path, train: dict, n_trace: int, n_edit: int) -> dict:
    model, tokenizer = load_model(str(root / "model"))
    layout = model_layout(model)
    requests = load_requests(root / "world" / "counterfact.json")
    known = known_facts(model, tokenizer, requests, "first_token", 64)
    traces = trace_facts(model, tokenizer, known[:n_trace], TracingConfig(kinds=("hidden",), tokens=("subject_last",)),
                         progress=False)
    total = (traces["p_clean"] - traces["p_corrupted"]).groupby(traces["case_id"]).first().mean()
    at_subject = traces[traces["layer"] == 0]["effect"].mean()
    layers = list(range(train.get("mlp_layers") or layout.n_layers))
    corpus = load_corpus(str(root / "world" / "wiki.jsonl"))
    moments = collect_second_moments(model, tokenizer, layout, layers, corpus.texts, StatsConfig(dtype="float64"),
                                     progress=False)
    ctx = ExperimentContext(model, tokenizer, root.name, {l: m.mean for l, m in moments.items()}, progress=False)
    best = None
    for layer in layers:
        row = single_edits(ctx, requests[:n_edit], make_hparams("rome", layers=(layer,))).iloc[0]
        if best is None or row["S"] > best["S"]:
            best = row
    return {"known": f"{len(known)}/{len(requests)}", "subject_share_layer0": round(float(at_subject / total), 3),
            "rome_layer": best["layers"], **{m: round(float(best[m]), 1) for m in ("ES", "PS", "NS", "S")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-trace", type=int, default=128)
    parser.add_argument("--n-edit", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="folder for worlds and models (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="toy-design-"))
    for name in args.variants:
        world, train = VARIANTS[name]
        root = out / name
        started = time.perf_counter()
        build_world(root / "world", **world)
        report = train_model(root / "world", root / "model", TrainConfig(**{**train, "threads": args.threads}))
        result = {"variant": name, "recall_edit": round(report["recall_edit"], 3),
                  "train_s": round(report["train_seconds"]), **evaluate(root, train, args.n_trace, args.n_edit),
                  "total_s": round(time.perf_counter() - started)}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
