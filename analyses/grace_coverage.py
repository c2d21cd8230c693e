"""Which downstream questions fall inside GRACE's codebook after sequential edits?

GRACE replaces a module's output wherever the query (the module's input at the prompt's last
token) lies within a key's radius. This applies the default run's sequential GRACE edits (the
first N records, one at a time, config.yaml's hyperparameters) to the prepared toy model and
counts the questions of a downstream task whose query lands inside some key's radius: those are
answered with an edited object whatever they ask.

What it shows: why GRACE's downstream accuracy drops after many sequential edits on the toy model
(docs/toy_model.md), question by question. Run from the repository root after `make reproduce`:

    python analyses/grace_coverage.py                     # needs resources/toy
    python analyses/grace_coverage.py --edits 128 --task toy_facts --limit 200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editlib.methods.grace.session import GraceEditor  # noqa: E402
from editlib.methods.grace import GraceHparams
from editlib.model.loading import load_model  # noqa: E402
from editlib.model.layout import model_layout
from editlib.data.records import load_requests  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--edits", type=int, default=128)
    parser.add_argument("--task", default="toy_facts")
    parser.add_argument("--limit", type=int, default=200, help="first questions of the task (downstream.limit)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = yaml.safe_load(args.config.read_text())
    resources = ROOT / "resources" / config["run"]
    model, tokenizer = load_model(str(resources / "model"))
    grace = dict(config["methods"]["grace"])
    module_name = model_layout(model).rewrite(grace.pop("layers")[0])
    editor = GraceEditor(model, tokenizer, module_name, GraceHparams(**grace))
    for request in load_requests(resources / "data" / "records.json")[: args.edits]:
        editor.edit([request])

    queries = []
    hook = dict(model.named_modules())[module_name].register_forward_hook(
        lambda module, inputs, output: queries.append(inputs[0][:, -1].detach()))
    docs = [json.loads(line) for line in open(resources / "data" / "tasks" / f"{args.task}.jsonl")][: args.limit]
    with editor.disabled(), torch.no_grad():
        for doc in docs:
            model(**tokenizer(doc["question"], return_tensors="pt"))
    hook.remove()
    distance, nearest = editor.codebook.nearest(torch.cat(queries))
    radius = editor.codebook.epsilons[nearest]
    caught = (distance <= radius).tolist()
    print(f"{len(editor.codebook)} codebook keys after {args.edits} edits; {sum(caught)} of {len(docs)} "
          f"{args.task} questions fall inside a key's radius:")
    for doc, hit, d, r, j in zip(docs, caught, distance.tolist(), radius.tolist(), nearest.tolist()):
        if hit:
            print(f"  {doc['question']!r}: inside the key of the edit to {editor.codebook.labels[j]!r} "
                  f"(distance {d:.3f} <= radius {r:.3f})")


if __name__ == "__main__":
    main()
