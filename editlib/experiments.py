"""The studies' experiments: layer sweep, single edits, batched edits, sequential-batched edits.

Each returns a tidy pandas frame with RESULT_COLUMNS (one observation per row). Sequential runs
checkpoint after every batch into one safetensors file (edit state + rows so far) written
atomically, and resume from it with bit-identical results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from .editing import Editor
from .grace import GraceEditor, GraceHparams
from .hparams import EditHparams, make_hparams
from .mend import MendEditor
from .models import model_layout
from .io import content_key, load_tensors, save_tensors
from .metrics import counterfact_metrics, counterfact_scores, generation_entropy
from .records import EditRequest, batches
from .target_store import TargetStore
from .templates import sample_context_templates

log = logging.getLogger(__name__)

METRICS = ["ES", "PS", "NS", "S", "EM", "PM", "NM", "GE"]
# 95% bootstrap interval over facts of every metric but GE (editlib.metrics.bootstrap_intervals)
INTERVALS = [f"{name}_{bound}" for name in METRICS if name != "GE" for bound in ("lo", "hi")]
RESULT_COLUMNS = ["experiment", "model", "method", "layers", "batch_size", "n_edits", "step", "scope", *METRICS,
                  *INTERVALS, "n_records"]
DOWNSTREAM_COLUMNS = ["experiment", "model", "method", "batch_size", "n_edits", "task", "metric", "value", "stderr"]

Downstream = Callable[[object, object], list[dict]]


@dataclass
class ExperimentContext:
    """A loaded (unedited) model with its per-layer statistics C; experiments leave it unedited."""

    model: object
    tokenizer: object
    model_name: str
    second_moments: dict[int, torch.Tensor]
    progress: bool = True
    generation_entropy: bool = False
    target_store: TargetStore | None = None
    _templates: dict = field(default_factory=dict, repr=False)

    def templates(self, hparams: EditHparams) -> list[str]:
        """Context templates of the UNEDITED model, sampled once per (lengths, seed)."""
        key = (hparams.context_lengths, hparams.template_seed)
        if key not in self._templates:
            self._templates[key] = sample_context_templates(self.model, self.tokenizer, *key)
        return self._templates[key]

    def editor(self, hparams: EditHparams) -> Editor:
        return Editor(self.model, self.tokenizer, hparams, self.second_moments, self.templates(hparams), self.progress,
                      self.target_store)

    def session(self, spec: "EditHparams | GraceSpec | MendSpec"):
        """An editing session for a locate-and-edit method, GRACE or MEND."""
        if isinstance(spec, GraceSpec):
            return GraceSession(self, spec)
        if isinstance(spec, MendSpec):
            return MendSession(self, spec)
        return self.editor(spec)


@dataclass(frozen=True)
class GraceSpec:
    """GRACE on the edited module of one layer."""

    layers: tuple[int, ...]
    hparams: GraceHparams = GraceHparams()
    method: str = "grace"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MendSpec:
    """MEND with a trained hypernetwork saved at `checkpoint` (editlib.mend.train_mend + save)."""

    checkpoint: str
    layers: tuple[int, ...] = ()
    method: str = "mend"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class GraceSession:
    """Sequential GRACE edits; the base weights never change, the codebook is the state."""

    def __init__(self, ctx: ExperimentContext, spec: GraceSpec):
        self.ctx, self.spec = ctx, spec
        self.module_name = model_layout(ctx.model).rewrite(spec.layers[0])
        self.editor = GraceEditor(ctx.model, ctx.tokenizer, self.module_name, spec.hparams)
        self.n_edits = 0

    def apply(self, requests: Sequence[EditRequest]) -> dict:
        self.n_edits += len(requests)
        return self.editor.edit(requests)

    def scoring(self, requests: Sequence[EditRequest]):
        """GRACE must query each scored row at its prompt's last token, not the target's."""
        prompts = [text for r in requests for text in (r.text, *r.paraphrase_prompts, *r.neighborhood_prompts)]
        return self.editor.prompt_queries(prompts)

    def restore(self) -> None:
        self.editor.remove()
        self.editor = GraceEditor(self.ctx.model, self.ctx.tokenizer, self.module_name, self.spec.hparams)
        self.n_edits = 0

    def close(self) -> None:
        self.editor.remove()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"codebook.{k}": v.cpu().contiguous() for k, v in self.editor.codebook.tensors().items()}
        state["n_edits"] = torch.tensor(self.n_edits)
        state["labels"] = torch.tensor(list(json.dumps(self.editor.codebook.labels).encode()), dtype=torch.uint8)
        state["generator"] = self.editor.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        labels = json.loads(bytes(state["labels"].tolist()).decode())
        tensors = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("codebook.")}
        self.editor.codebook.load_tensors(tensors, labels)
        self.editor.generator.set_state(state["generator"])
        self.n_edits = int(state["n_edits"])


class MendSession:
    """Sequential MEND edits with a trained hypernetwork; the edited weights are the state."""

    def __init__(self, ctx: ExperimentContext, spec: MendSpec):
        self.ctx = ctx
        self.editor = MendEditor.load(ctx.model, ctx.tokenizer, spec.checkpoint)
        self.names = [f"{name}.weight" for name in self.editor.hypernet.module_names]
        self.original = {name: ctx.model.get_parameter(name).detach().clone() for name in self.names}
        self.n_edits = 0

    def apply(self, requests: Sequence[EditRequest]) -> dict:
        self.n_edits += len(requests)
        self.editor.edit(requests)
        return {}

    def restore(self) -> None:
        with torch.no_grad():
            for name, weight in self.original.items():
                self.ctx.model.get_parameter(name).copy_(weight)
        self.n_edits = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"weight.{n}": self.ctx.model.get_parameter(n).detach().cpu().contiguous() for n in self.names}
        state["n_edits"] = torch.tensor(self.n_edits)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name in self.names:
                self.ctx.model.get_parameter(name).copy_(state[f"weight.{name}"])
        self.n_edits = int(state["n_edits"])


def read_results(path: str | Path) -> pd.DataFrame:
    """A results or downstream CSV written by the workflow (layer labels kept as strings); an
    empty file (no rows, no header) reads as an empty frame."""
    path = Path(path)
    return pd.read_csv(path, dtype={"layers": str}) if path.stat().st_size > 1 else pd.DataFrame()


def layers_label(layers: Sequence[int]) -> str:
    return ",".join(str(layer) for layer in layers)


def result_row(experiment: str, ctx: ExperimentContext, hparams, batch_size: int, n_edits: int,
               step: int, scope: str, metrics: dict, n_records: int) -> dict:
    row = {"experiment": experiment, "model": ctx.model_name, "method": hparams.method,
           "layers": layers_label(hparams.layers), "batch_size": batch_size, "n_edits": n_edits, "step": step,
           "scope": scope, "n_records": n_records}
    row.update({name: metrics.get(name, float("nan")) for name in (*METRICS, *INTERVALS)})
    return row


def score_records(ctx: ExperimentContext, requests: Sequence[EditRequest], session=None) -> pd.DataFrame:
    """Per-prompt CounterFact scores of the current model on `requests` (GRACE queried at prompt ends)."""
    scoring = session.scoring(requests) if hasattr(session, "scoring") else contextlib.nullcontext()
    with scoring:
        return counterfact_scores(ctx.model, ctx.tokenizer, requests)


def records_metrics(ctx: ExperimentContext, scores: pd.DataFrame, requests: Sequence[EditRequest]) -> dict:
    """CounterFact metrics of `requests`' rows of `scores` (and GE of the current model when enabled)."""
    cases = {request.case_id for request in requests}
    metrics = counterfact_metrics(scores[scores["case_id"].isin(cases)])
    if ctx.generation_entropy:
        metrics["GE"] = generation_entropy(ctx.model, ctx.tokenizer, requests)
    return metrics


def single_edit_scores(ctx: ExperimentContext, requests: Sequence[EditRequest], hparams: EditHparams) -> pd.DataFrame:
    """Per-prompt scores of each request edited alone into the unedited model (then restored)."""
    editor = ctx.editor(hparams)
    edits = editor.single_edits(requests)
    frames = []
    for index, request in enumerate(tqdm(requests, desc=f"{hparams.method} single edits", disable=not ctx.progress)):
        with editor.single_edit_applied(edits, index):
            frames.append(counterfact_scores(ctx.model, ctx.tokenizer, [request]))
    return pd.concat(frames, ignore_index=True)


def single_edits(ctx: ExperimentContext, requests: Sequence[EditRequest], hparams: EditHparams,
                 experiment: str = "single") -> pd.DataFrame:
    """One fact at a time, the model restored between facts; one aggregated row."""
    metrics = counterfact_metrics(single_edit_scores(ctx, requests, hparams))
    return pd.DataFrame([result_row(experiment, ctx, hparams, 1, 1, len(requests), "single", metrics, len(requests))],
                        columns=RESULT_COLUMNS)


def layer_sweep(ctx: ExperimentContext, requests: Sequence[EditRequest], method: str, layers: Sequence[int],
                overrides: dict | None = None) -> pd.DataFrame:
    """Single edits at each layer in `layers` (one layer edited at a time); one row per layer."""
    overrides = {k: v for k, v in (overrides or {}).items() if k != "layers"}
    frames = [single_edits(ctx, requests, make_hparams(method, layers=(layer,), **overrides), "layer_sweep")
              for layer in layers]
    return pd.concat(frames, ignore_index=True)


def best_layer(frame: pd.DataFrame, metric: str = "S") -> int:
    """The layer with the highest mean `metric` in a layer-sweep frame (ties: the lowest layer)."""
    scores = frame.assign(layer=frame["layers"].astype(int)).groupby("layer")[metric].mean()
    return int(scores[scores == scores.max()].index.min())


def batched_edits(ctx: ExperimentContext, requests: Sequence[EditRequest], hparams: EditHparams,
                  batch_sizes: Sequence[int], downstream: Downstream | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """For each batch size: consecutive batches, each edited into the UNEDITED model and scored on
    its own records; one row per batch size (metrics over all batches' records).

    `downstream(model, tokenizer)` runs on the unedited model (n_edits 0) and with the first batch
    of every size applied. Returns (results, downstream rows).
    """
    rows, downstream_rows = [], []
    editor = ctx.editor(hparams)
    if downstream is not None:
        downstream_rows += _downstream_rows(ctx, hparams, 0, 0, downstream, "batched")
    for batch_size in batch_sizes:
        if batch_size > len(requests):
            raise ValueError(f"batch size {batch_size} exceeds the {len(requests)} available requests")
        usable = requests[: len(requests) - len(requests) % batch_size]
        frames = []
        if batch_size == 1:  # batches of one fact are single edits: all computed in batched passes
            frames.append(single_edit_scores(ctx, usable, hparams))
        for index, batch in enumerate(tqdm(list(batches(usable, batch_size)), desc=f"{hparams.method} batch {batch_size}",
                                           disable=not ctx.progress)):
            if batch_size == 1 and (downstream is None or index > 0):
                break
            editor.restore()
            editor.apply(batch)
            if batch_size > 1:
                frames.append(counterfact_scores(ctx.model, ctx.tokenizer, batch))
            if downstream is not None and index == 0:
                downstream_rows += _downstream_rows(ctx, hparams, batch_size, batch_size, downstream, "batched")
        editor.restore()
        metrics = counterfact_metrics(pd.concat(frames, ignore_index=True))
        rows.append(result_row("batched", ctx, hparams, batch_size, batch_size, len(frames), "batch", metrics, len(usable)))
    return pd.DataFrame(rows, columns=RESULT_COLUMNS), pd.DataFrame(downstream_rows, columns=DOWNSTREAM_COLUMNS)


def _checkpoint_key(ctx: ExperimentContext, requests, hparams, batch_size: int, total: int) -> str:
    return content_key({"model": ctx.model_name, "hparams": hparams.to_dict(), "batch_size": batch_size,
                        "total": total, "cases": [str(r.case_id) for r in requests]})


def _save_checkpoint(path: Path, editor, key: str, step: int, rows: list, downstream_rows: list) -> None:
    metadata = {"key": key, "step": str(step), "rows": json.dumps(rows), "downstream": json.dumps(downstream_rows)}
    save_tensors(path, editor.state_dict(), metadata)


def _load_checkpoint(path: Path, key: str):
    if not path.exists():
        return None
    try:
        state, metadata = load_tensors(path)
        if metadata.get("key") != key:
            log.warning("checkpoint %s belongs to another run (key mismatch); starting over", path)
            return None
        return state, int(metadata["step"]), json.loads(metadata["rows"]), json.loads(metadata["downstream"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        log.warning("unreadable checkpoint %s (%s); starting over", path, err)
        return None


def sequential_edits(ctx: ExperimentContext, requests: Sequence[EditRequest], hparams, batch_size: int,
                     total_edits: int, checkpoint_path: str | Path | None = None, downstream: Downstream | None = None,
                     downstream_at: Sequence[int] | None = None,
                     eval_at: Sequence[int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Batches of `batch_size` applied one after another without reverting, up to `total_edits`.

    After every batch: metrics on the current batch ("current_batch"); on every fact edited so far
    ("edited_so_far") after the batches whose cumulative edit count is in `eval_at` and after the
    last one (default: every batch). `downstream(model, tokenizer)` runs before editing (n_edits 0)
    and after the batches whose cumulative edit count is in `downstream_at` (default: every batch).
    With `checkpoint_path`, state is saved after every batch and a rerun resumes from it.
    `hparams` is an EditHparams (ROME ... AlphaEdit), a GraceSpec or a MendSpec.
    """
    if total_edits > len(requests):
        raise ValueError(f"total_edits={total_edits} exceeds the {len(requests)} available requests")
    requests = list(requests[:total_edits])
    plan = list(batches(requests, batch_size))
    editor = ctx.session(hparams)
    key = _checkpoint_key(ctx, requests, hparams, batch_size, total_edits)
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    rows: list[dict] = []
    downstream_rows: list[dict] = []
    start = 0
    resumed = _load_checkpoint(path, key) if path is not None else None
    if resumed is not None:
        state, start, rows, downstream_rows = resumed
        editor.load_state_dict(state)
        log.info("resuming %s from batch %d of %d", path, start, len(plan))
    elif downstream is not None:
        downstream_rows += _downstream_rows(ctx, hparams, batch_size, 0, downstream)
    try:
        for step in tqdm(range(start, len(plan)), desc=f"{hparams.method} sequential b={batch_size}",
                         disable=not ctx.progress, initial=start, total=len(plan)):
            batch = plan[step]
            editor.apply(batch)
            n_edits = editor.n_edits
            edited = requests[:n_edits]
            whole = eval_at is None or n_edits in set(eval_at) or step == len(plan) - 1
            scores = score_records(ctx, edited if whole else batch, editor)  # one pass; the batch is part of it
            rows.append(result_row("sequential", ctx, hparams, batch_size, n_edits, step + 1, "current_batch",
                                   records_metrics(ctx, scores, batch), len(batch)))
            if whole:
                rows.append(result_row("sequential", ctx, hparams, batch_size, n_edits, step + 1, "edited_so_far",
                                       records_metrics(ctx, scores, edited), len(edited)))
            if downstream is not None and (downstream_at is None or n_edits in set(downstream_at)):
                downstream_rows += _downstream_rows(ctx, hparams, batch_size, n_edits, downstream)
            if path is not None:
                _save_checkpoint(path, editor, key, step + 1, rows, downstream_rows)
    finally:
        editor.restore()
        if hasattr(editor, "close"):
            editor.close()
    return pd.DataFrame(rows, columns=RESULT_COLUMNS), pd.DataFrame(downstream_rows, columns=DOWNSTREAM_COLUMNS)


def _downstream_rows(ctx, hparams, batch_size, n_edits, downstream: Downstream, experiment: str = "sequential") -> list[dict]:
    base = {"experiment": experiment, "model": ctx.model_name, "method": hparams.method,
            "batch_size": batch_size, "n_edits": n_edits}
    return [{**base, **{k: row.get(k) for k in ("task", "metric", "value", "stderr")}}
            for row in downstream(ctx.model, ctx.tokenizer)]
