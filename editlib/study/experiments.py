"""The studies' experiments: layer sweep, single edits, batched edits, sequential-batched edits.

Each returns a tidy pandas frame with `tables.RESULT_COLUMNS` (one observation per row). Sequential runs
checkpoint at most every `checkpoint_minutes` (and after the last batch) into one safetensors file
(edit state + rows so far) written atomically, and resume from it, replaying the batches after
it, with bit-identical results.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pandas as pd
import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from editlib.data.records import EditRequest, batches, record_kind
from editlib.editing.hparams import LocateEditHparams
from editlib.editing.session import EditSession
from editlib.editing.target_store import TargetStore
from editlib.editing.templates import sample_context_templates
from editlib.eval.metrics import edit_metrics, edit_scores, generation_entropy
from editlib.io import content_key, load_tensors, read_metadata, save_tensors
from editlib.methods.registry import get_method, make_spec
from editlib.study.tables import (
    DOWNSTREAM_COLUMNS,
    DOWNSTREAM_FIELDS,
    INTERVALS,
    METRICS,
    RESULT_COLUMNS,
    SENSITIVITY_COLUMNS,
    STEP_COLUMNS,
    SUBTASK_FIELDS,
)

log = logging.getLogger(__name__)

Downstream = Callable[[object, object], list[dict]]
Probe = Callable[[object], dict]  # model -> {"agreement", "top_token_share"} (editlib.eval.collapse.PredictionProbe)


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

    def templates(self, spec: LocateEditHparams) -> list[str]:
        """Context templates of the UNEDITED model, sampled once per (lengths, seed)."""
        key = (spec.context_lengths, spec.template_seed)
        if key not in self._templates:
            self._templates[key] = sample_context_templates(self.model, self.tokenizer, *key)
        return self._templates[key]

    def session(self, spec) -> EditSession:
        """An editing session of `spec`'s method (editlib.methods.registry) on this context's model."""
        return get_method(spec.method).open(self, spec)


def layers_label(layers: Sequence[int]) -> str:
    return ",".join(str(layer) for layer in layers)


def run_labels(experiment: str, ctx: ExperimentContext, spec, batch_size: int, n_edits: int, step: int) -> dict:
    """The columns that name a row's run and point in it (sample 0; the pipeline relabels samples)."""
    return {"experiment": experiment, "model": ctx.model_name, "method": spec.method,
            "layers": layers_label(spec.layers), "batch_size": batch_size, "sample": 0, "n_edits": n_edits, "step": step}


def result_row(experiment: str, ctx: ExperimentContext, spec, batch_size: int, n_edits: int,
               step: int, scope: str, metrics: dict, n_records: int, records: str = "counterfact") -> dict:
    row = {**run_labels(experiment, ctx, spec, batch_size, n_edits, step),
           "scope": scope, "records": records, "n_records": n_records}
    row.update({name: metrics.get(name, float("nan")) for name in (*METRICS, *INTERVALS)})
    return row


def score_records(ctx: ExperimentContext, requests: Sequence[EditRequest], session: EditSession) -> pd.DataFrame:
    """Per-prompt scores (CounterFact or ZsRE, editlib.eval.metrics.edit_scores) of the current model
    on `requests`, inside the session's scoring context (GRACE queried at prompt ends)."""
    with session.scoring(requests):
        return edit_scores(ctx.model, ctx.tokenizer, requests, share_prompts=session.scores_prompts_once)


def records_metrics(ctx: ExperimentContext, scores: pd.DataFrame, requests: Sequence[EditRequest],
                    entropy: bool = True) -> dict:
    """Edit metrics of `requests`' rows of `scores`, and with `entropy` GE of the current model when
    enabled (ctx.generation_entropy): 100 sampled tokens per generation prompt of every request,
    the costliest metric by far."""
    cases = {request.case_id for request in requests}
    metrics = edit_metrics(scores[scores["case_id"].isin(cases)])
    if entropy and ctx.generation_entropy:
        metrics["GE"] = generation_entropy(ctx.model, ctx.tokenizer, requests)
    return metrics


def single_edit_scores(ctx: ExperimentContext, requests: Sequence[EditRequest], spec,
                       session: EditSession | None = None) -> pd.DataFrame:
    """Per-prompt scores of each request edited alone into the unedited model (then restored),
    with `session` (a new session of `spec` when None, closed at the end)."""
    own = session is None
    session = ctx.session(spec) if own else session
    frames = []
    try:
        edited = session.one_at_a_time(requests)
        for request in tqdm(edited, desc=f"{spec.method} single edits", total=len(requests), disable=not ctx.progress):
            frames.append(score_records(ctx, [request], session))
    finally:
        if own:
            session.close()
    return pd.concat(frames, ignore_index=True)


def single_edits(ctx: ExperimentContext, requests: Sequence[EditRequest], spec,
                 experiment: str = "single") -> pd.DataFrame:
    """One fact at a time, the model restored between facts; one aggregated row. `spec`: the
    spec of any registered method (editlib.methods.registry)."""
    metrics = edit_metrics(single_edit_scores(ctx, requests, spec))
    return pd.DataFrame([result_row(experiment, ctx, spec, 1, 1, len(requests), "single", metrics, len(requests),
                                    record_kind(requests))],
                        columns=RESULT_COLUMNS)


def layer_sweep(ctx: ExperimentContext, requests: Sequence[EditRequest], method: str, layers: Sequence[int],
                overrides: dict | None = None) -> pd.DataFrame:
    """Single edits at each layer in `layers` (one layer edited at a time); one row per layer."""
    overrides = {k: v for k, v in (overrides or {}).items() if k != "layers"}
    frames = [single_edits(ctx, requests, make_spec(method, overrides, (layer,)), "layer_sweep") for layer in layers]
    return pd.concat(frames, ignore_index=True)


def sensitivity(ctx: ExperimentContext, requests: Sequence[EditRequest], method: str, layers: Sequence[int],
                overrides: dict, parameter: str, values: Sequence[float], batch_sizes: Sequence[int] = (1,)
                ) -> pd.DataFrame:
    """Edits with hyperparameter `parameter` set to each of `values` (the others as in `overrides`):
    single edits (batch size 1) and, for each larger batch size, consecutive batches each edited
    into the unedited model; one row per (value, batch size), labelled by `parameter` and `value`."""
    frames = []
    for value in values:
        spec = make_spec(method, {**overrides, parameter: value}, tuple(layers))
        for batch_size in batch_sizes:
            frame = (single_edits(ctx, requests, spec, "sensitivity") if batch_size == 1
                     else batched_edits(ctx, requests, spec, [batch_size])[0].assign(experiment="sensitivity"))
            frames.append(frame.assign(parameter=parameter, value=float(value)))
    return pd.concat(frames, ignore_index=True)[SENSITIVITY_COLUMNS]


def best_layer(frame: pd.DataFrame, metric: str = "S") -> int:
    """The layer with the highest mean `metric` in a layer-sweep frame (ties: the lowest layer)."""
    scores = frame.assign(layer=frame["layers"].astype(int)).groupby("layer")[metric].mean()
    return int(scores[scores == scores.max()].index.min())


def batched_edits(ctx: ExperimentContext, requests: Sequence[EditRequest], spec,
                  batch_sizes: Sequence[int], downstream: Downstream | None = None,
                  states: Mapping[int, str | Path] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """For each batch size: consecutive batches, each edited into the UNEDITED model and scored on
    its own records; one row per batch size (metrics over all batches' records).

    `downstream(model, tokenizer)` runs on the unedited model (n_edits 0) and with the first batch
    of every size applied; `states` maps batch sizes to paths where the edits of that first batch
    are saved (save_state). Returns (results, downstream rows).
    """
    states = states or {}
    rows, downstream_rows = [], []
    session = ctx.session(spec)
    try:
        if downstream is not None:
            downstream_rows += _downstream_rows(ctx, spec, 0, 0, downstream, "batched")
        for batch_size in batch_sizes:
            if batch_size > len(requests):
                raise ValueError(f"batch size {batch_size} exceeds the {len(requests)} available requests")
            usable = requests[: len(requests) - len(requests) % batch_size]
            plan = list(batches(usable, batch_size))
            frames = []
            if batch_size == 1:  # batches of one fact are single edits (batched passes where the method can)
                frames.append(single_edit_scores(ctx, usable, spec, session))
            for index, batch in enumerate(tqdm(plan, desc=f"{spec.method} batch {batch_size}", disable=not ctx.progress)):
                if batch_size == 1 and (index > 0 or downstream is None and batch_size not in states):
                    break
                session.restore()
                session.apply(batch)
                if batch_size > 1:
                    frames.append(score_records(ctx, batch, session))
                if downstream is not None and index == 0:
                    downstream_rows += _downstream_rows(ctx, spec, batch_size, batch_size, downstream, "batched")
                if index == 0 and batch_size in states:
                    save_state(states[batch_size], session, spec, "batched", batch_size, batch_size)
            session.restore()
            metrics = edit_metrics(pd.concat(frames, ignore_index=True))
            rows.append(result_row("batched", ctx, spec, batch_size, batch_size, len(plan), "batch", metrics,
                                   len(usable), record_kind(requests)))
    finally:
        session.close()
    return pd.DataFrame(rows, columns=RESULT_COLUMNS), pd.DataFrame(downstream_rows, columns=DOWNSTREAM_COLUMNS)


def _checkpoint_key(ctx: ExperimentContext, requests, spec, batch_size: int, total: int) -> str:
    return content_key({"model": ctx.model_name, "spec": spec.to_dict(), "batch_size": batch_size,
                        "total": total, "cases": [str(r.case_id) for r in requests]})


def _save_checkpoint(path: Path, session, key: str, step: int, rows: list, downstream_rows: list,
                     step_rows: list) -> None:
    metadata = {"key": key, "step": str(step), "rows": json.dumps(rows), "downstream": json.dumps(downstream_rows),
                "steps": json.dumps(step_rows)}
    save_tensors(path, session.state_dict(), metadata)


def _load_checkpoint(path: Path, key: str):
    if not path.exists():
        return None
    try:
        state, metadata = load_tensors(path)
        if metadata.get("key") != key:
            log.warning("checkpoint %s belongs to another run (key mismatch); starting over", path)
            return None
        return (state, int(metadata["step"]), json.loads(metadata["rows"]), json.loads(metadata["downstream"]),
                json.loads(metadata["steps"]))
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        log.warning("unreadable checkpoint %s (%s); starting over", path, err)
        return None


def sequential_edits(ctx: ExperimentContext, requests: Sequence[EditRequest], spec, batch_size: int,
                     total_edits: int, checkpoint_path: str | Path | None = None, downstream: Downstream | None = None,
                     downstream_at: Sequence[int] | None = None, eval_at: Sequence[int] | None = None,
                     states: Mapping[int, str | Path] | None = None, checkpoint_minutes: float = 0.0,
                     clock: Callable[[], float] = time.monotonic, entropy_records: int | None = None,
                     probe: Probe | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Batches of `batch_size` applied one after another without reverting, up to `total_edits`.
    Returns (edit metrics, downstream rows, one row per batch: tables.STEP_COLUMNS).

    After every batch: metrics on the current batch ("current_batch"); on every fact edited so far
    ("edited_so_far") after the batches whose cumulative edit count is in `eval_at` and after the
    last one (default: every batch). `downstream(model, tokenizer)` runs before editing (n_edits 0)
    and after the batches whose cumulative edit count is in `downstream_at` (default: every batch).
    `states` maps cumulative edit counts to paths: the session's edits are saved there (save_state)
    when the count is reached, for `states_downstream`.

    Cost: for N edits in k batches the records scored are N plus the edited-so-far count of each
    evaluation, sum(eval_at) + N at most; without `eval_at` every batch rescores every fact edited so
    far, N(k+1)/2 in all (quadratic; editlib.study requires eval_at for runs of more than 64
    batches). After every batch, the step row holds the size of the weight change the batch made
    (relative to the unedited weights, and as the change of the layers' outputs over the statistics'
    keys; locate-and-edit methods) and `probe(model)` when given (one forward pass over fixed texts,
    editlib.eval.collapse.PredictionProbe). Generation entropy (ctx.generation_entropy) is computed
    on the edited-so-far rows only, never on the current-batch rows (those rows' GE is NaN), over the
    generation prompts of at most `entropy_records` of the facts edited so far (evenly spaced over
    the edit order; None: all): 100 sampled tokens per prompt, so at most len(eval_at) x
    entropy_records x prompts per record generations in a run.

    With `checkpoint_path`, the edit state and the rows so far are saved after the first batch
    that ends `checkpoint_minutes` (by `clock`, seconds) after the previous save or the start,
    and after the last batch; 0 saves after every batch. A rerun resumes from the checkpoint and
    replays the batches after it (the edits, scores and saved `states` come out bit-identical to an
    uninterrupted run); when a state the checkpoint is past is missing on disk it starts over.
    `spec` is the spec of any registered method (editlib.methods.registry).
    """
    if total_edits > len(requests):
        raise ValueError(f"total_edits={total_edits} exceeds the {len(requests)} available requests")
    requests = list(requests[:total_edits])
    kind = record_kind(requests)
    plan = list(batches(requests, batch_size))
    session = ctx.session(spec)
    key = _checkpoint_key(ctx, requests, spec, batch_size, total_edits)
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    rows: list[dict] = []
    downstream_rows: list[dict] = []
    step_rows: list[dict] = []
    start = 0
    resumed = _load_checkpoint(path, key) if path is not None else None
    if resumed is not None:
        done = min(resumed[1] * batch_size, total_edits)
        missing = sorted(n for n, state_path in (states or {}).items() if n <= done and not Path(state_path).exists())
        if missing:
            log.warning("checkpoint %s is past the edit states for n_edits %s, which are missing; starting over",
                        path, missing)
            resumed = None
    if resumed is not None:
        state, start, rows, downstream_rows, step_rows = resumed
        session.load_state_dict(state)
        log.info("resuming %s from batch %d of %d", path, start, len(plan))
    elif downstream is not None:
        downstream_rows += _downstream_rows(ctx, spec, batch_size, 0, downstream)
    interval = 60.0 * checkpoint_minutes
    saved_at = clock()
    try:
        for step in tqdm(range(start, len(plan)), desc=f"{spec.method} sequential b={batch_size}",
                         disable=not ctx.progress, initial=start, total=len(plan)):
            batch = plan[step]
            report = session.apply(batch)
            n_edits = session.n_edits
            step_rows.append(_step_row(ctx, spec, batch_size, n_edits, step + 1, report, probe))
            edited = requests[:n_edits]
            whole = eval_at is None or n_edits in set(eval_at) or step == len(plan) - 1
            scores = score_records(ctx, edited if whole else batch, session)  # one pass; the batch is part of it
            rows.append(result_row("sequential", ctx, spec, batch_size, n_edits, step + 1, "current_batch",
                                   records_metrics(ctx, scores, batch, entropy=False), len(batch), kind))
            if whole:
                metrics = records_metrics(ctx, scores, edited, entropy=False)
                if ctx.generation_entropy:
                    metrics["GE"] = generation_entropy(ctx.model, ctx.tokenizer, evenly_spaced(edited, entropy_records))
                rows.append(result_row("sequential", ctx, spec, batch_size, n_edits, step + 1, "edited_so_far",
                                       metrics, len(edited), kind))
            if downstream is not None and (downstream_at is None or n_edits in set(downstream_at)):
                downstream_rows += _downstream_rows(ctx, spec, batch_size, n_edits, downstream)
            if states and n_edits in states:
                save_state(states[n_edits], session, spec, "sequential", batch_size, n_edits)
            if path is not None and (step == len(plan) - 1 or clock() - saved_at >= interval):
                _save_checkpoint(path, session, key, step + 1, rows, downstream_rows, step_rows)
                saved_at = clock()
    finally:
        session.close()
    return (pd.DataFrame(rows, columns=RESULT_COLUMNS), pd.DataFrame(downstream_rows, columns=DOWNSTREAM_COLUMNS),
            pd.DataFrame(step_rows, columns=STEP_COLUMNS))


def _step_row(ctx: ExperimentContext, spec, batch_size: int, n_edits: int, step: int, report: dict | None,
              probe: Probe | None) -> dict:
    row = {**run_labels("sequential", ctx, spec, batch_size, n_edits, step),
           **{name: (report or {}).get(name, float("nan")) for name in ("relative_update_norm", "relative_output_change")},
           "agreement": float("nan"), "top_token_share": float("nan")}
    if probe is not None:
        row.update(probe(ctx.model))
    return row


def evenly_spaced(items: Sequence, n: int | None) -> list:
    """At most `n` of `items`, evenly spaced (the first included); all of them when n is None or
    there are no more than n."""
    if n is None or len(items) <= n:
        return list(items)
    return [items[index * len(items) // n] for index in range(n)]


def _labelled_downstream(rows: list[dict], base: dict, subtasks: bool) -> list[dict]:
    """`rows` of a downstream function labelled with `base`: the configured tasks' rows, and with
    `subtasks` also the leaf-task rows of groups (those with a "group" key)."""
    return [{**base, **{k: row.get(k) for k in (SUBTASK_FIELDS if "group" in row else DOWNSTREAM_FIELDS)}}
            for row in rows if subtasks or "group" not in row]


def _downstream_rows(ctx, spec, batch_size, n_edits, downstream: Downstream, experiment: str = "sequential",
                     subtasks: bool = False) -> list[dict]:
    base = {"experiment": experiment, "model": ctx.model_name, "method": spec.method,
            "batch_size": batch_size, "sample": 0, "n_edits": n_edits}
    return _labelled_downstream(downstream(ctx.model, ctx.tokenizer), base, subtasks)


# ---------------------------------------------------------------------------- saved edit states


def save_state(path: str | Path, session: EditSession, spec, experiment: str, batch_size: int, n_edits: int) -> None:
    """The session's current edits (its state_dict) with the labels of the run that made them."""
    save_tensors(path, session.state_dict(), {"experiment": experiment, "method": spec.method,
                                              "layers": layers_label(spec.layers), "batch_size": str(batch_size),
                                              "n_edits": str(n_edits)})


def state_labels(path: str | Path, metadata: dict[str, str] | None = None) -> dict:
    """The labels save_state wrote (experiment, method, layers, batch_size, n_edits): from
    `metadata` when the file was already read, else from the file's header only."""
    meta = metadata if metadata is not None else read_metadata(path)
    layers = tuple(int(layer) for layer in meta["layers"].split(",") if layer)
    return {"experiment": meta["experiment"], "method": meta["method"], "layers": layers,
            "batch_size": int(meta["batch_size"]), "n_edits": int(meta["n_edits"])}


class StateRows(Protocol):
    """Where `states_downstream` keeps each state's rows as soon as they are computed, so that a
    rerun skips the states evaluated before (editlib.study.pipeline.DownstreamPartials)."""

    def get(self, path: Path) -> list[dict] | None: ...

    def put(self, path: Path, rows: list[dict]) -> None: ...


def saved_states(states_dir: str | Path) -> list[Path]:
    """The edit states an editing job saved in `states_dir`, in order of their number of edits."""
    return sorted(Path(states_dir).glob("*.safetensors"), key=lambda path: state_labels(path)["n_edits"])


def states_downstream(ctx: ExperimentContext, spec, state_paths: Sequence[str | Path],
                      downstream: Downstream, partials: StateRows | None = None,
                      subtasks: bool = False) -> pd.DataFrame:
    """Downstream rows of each saved state, loaded by one session of `spec` onto the unedited model.

    With `partials`, a state whose rows it holds is not loaded nor evaluated again, and each newly
    evaluated state's rows go to it at once. With `subtasks`, the frame also holds the leaf-task
    rows of groups (a `group` column, empty on the configured tasks' rows).
    """
    rows: list[dict] = []
    session = ctx.session(spec)
    try:
        for path in map(Path, state_paths):
            done = partials.get(path) if partials is not None else None
            if done is None:
                state, metadata = load_tensors(path)
                labels = state_labels(path, metadata)
                session.restore()
                session.load_state_dict(state)
                done = _downstream_rows(ctx, spec, labels["batch_size"], labels["n_edits"], downstream,
                                        labels["experiment"], subtasks=True)
                if partials is not None:
                    partials.put(path, done)
            else:
                log.info("%s: downstream rows from an earlier run of this job", path)
            rows += [row for row in done if subtasks or "group" not in row]
    finally:
        session.close()
    columns = [*DOWNSTREAM_COLUMNS, "group"] if subtasks else DOWNSTREAM_COLUMNS
    return pd.DataFrame(rows, columns=columns)
