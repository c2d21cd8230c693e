"""Downstream (general-ability) evaluation of an in-memory, possibly edited, model through
lm-evaluation-harness 0.4.13 (the task files this project writes are in editlib/data/downstream_tasks.py).

`evaluate_downstream` wraps the live model in ``lm_eval.models.huggingface.HFLM`` (no save and
reload, so edits are seen as they are), evaluates each requested task (a group or tag counts as
one task) in its own lm-eval call, and returns tidy rows: one ``{task, metric, value, stderr,
n_items, error}`` per requested task and metric (a group as lm-eval aggregates it, `task_rows`; a
task that raised: one row with its ``error``) and one ``{group, task, metric, value, stderr,
n_items}`` per leaf task of a group or tag; callers add method / model / n_edits columns. Every
row carries the metric's ``higher_is_better`` as lm-eval reports it (False for perplexities),
and the ratio metrics of loglikelihood_rolling tasks (word_perplexity, bits_per_byte) get the
standard error lm-eval does not give them (`ratio_metric_stderr`, from the logged samples). By
default the wrapper is HFLM's subclass from `shared_context_lm_class`, which runs each distinct
context once for all its continuations (2.5x faster on SmolLM2's 3-shot BIG-bench tasks, the same
scores to float rounding; docs/performance.md).

Scoring is lm-eval's multiple-choice log-likelihood: for each choice the continuation is
``target_delimiter + choice`` (" A", " positive", ...), context and continuation are tokenized
together and split at ``len(tok(context))``, so a tokenizer that prepends BOS (Llama-3) keeps BOS
in the context only and it is never scored. ``acc`` is the argmax of the summed continuation
log-probabilities, ``acc_norm`` the argmax after dividing by the choice's character length.

Caveat for GRACE-style adaptors keyed on "the last token": lm-eval right-pads a batch and passes no
attention mask, so in a batch the last position of a shorter row is padding; score such wrappers
with ``share_contexts=False, equal_length_batches=True`` (each batch holds rows of one length).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from editlib.eval.metric_names import LOG_CHANGE_METRICS, RATIO_METRICS

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- evaluation


@contextlib.contextmanager
def hub_offline(enabled: bool = True) -> Iterator[None]:
    """Turn Hugging Face Hub / datasets network access off inside the block, and back after.

    Both libraries read HF_HUB_OFFLINE / HF_DATASETS_OFFLINE once, at import, into module
    constants (which their code then consults at call time). Setting only ``os.environ`` would be
    ignored when they were imported earlier, and would leak into the rest of the process when
    they are imported inside the block; so they are imported first and the constants patched
    and restored, together with the environment.
    """
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    env_keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved_env = {key: os.environ.get(key) for key in env_keys}
    targets = [
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
    ]
    saved_attrs = [(module, attr, getattr(module, attr)) for module, attr in targets if hasattr(module, attr)]
    try:
        for key in env_keys:
            os.environ[key] = "1"
        for module, attr, _ in saved_attrs:
            setattr(module, attr, True)
        yield
    finally:
        for module, attr, value in saved_attrs:
            setattr(module, attr, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


CONTEXT_BATCH_TOKENS = 1024  # on CPU, distinct contexts run together up to this many padded tokens
_SHARED_CONTEXT_LM = None
_PLAIN_LM: dict[bool, type] = {}


class LongestTextsFirst:
    """Mixed into HFLM: perplexity (loglikelihood_rolling) requests scored longest text first, in
    tokens. HFLM scores the texts' windows in batches of the batch size in request order, each
    batch padded to its longest text; sorted, a batch holds texts of similar length: the same
    scores over fewer padded tokens (1,000 Wikipedia leads of 107k tokens in batches of 32: 114k
    padded tokens instead of 242k)."""

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        lengths = [len(self.tok_encode(request.args[0])) for request in requests]
        order = sorted(range(len(requests)), key=lambda i: -lengths[i])
        scores = super().loglikelihood_rolling([requests[i] for i in order], disable_tqdm)
        results = [0.0] * len(requests)
        for index, score in zip(order, scores, strict=True):
            results[index] = score
        return results


class EqualLengthBatches:
    """Mixed into HFLM for a model whose outputs read each row's last position (GRACE's codebook
    query): log-likelihood requests are scored in batches whose rows all have one input length.
    HFLM right-pads a batch and passes no attention mask, so in a mixed batch a shorter row's last
    position is padding; here no row is padded, and the scores are those of batch size 1 (each
    request alone) up to float rounding, in as few batches as the lengths allow. Perplexity
    requests are cut into lm-eval's rolling windows, as HFLM cuts them, and all texts' windows
    scored together, so that windows of one length share batches across texts (HFLM hands its
    log-likelihood loop a batch's worth of windows at a time)."""

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        from lm_eval import utils

        windows, owners = [], []
        for index, request in enumerate(requests):
            cut = utils.get_rolling_token_windows(token_list=self.tok_encode(request.args[0]),
                                                  prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                                                  context_len=1)
            for context, continuation in map(utils.make_disjoint_window, cut):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (loglikelihood, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[owner] += loglikelihood
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        by_length: dict[int, list[int]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            # HFLM's input: (context + continuation)[-(max_length + 1):][:-1]
            length = min(len(context) + len(continuation), self.max_length + 1) - 1
            by_length.setdefault(length, []).append(index)
        results: list = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                  desc="Running loglikelihood requests, one length per batch") as progress:
            for length in sorted(by_length, reverse=True):
                indices = by_length[length]
                scores = super()._loglikelihood_tokens([requests[i] for i in indices], disable_tqdm=True,
                                                       override_bs=override_bs)
                for index, score in zip(indices, scores, strict=True):
                    results[index] = score
                progress.update(len(indices))
        return results


def plain_lm_class(equal_length_batches: bool = False):
    """HFLM itself, every request its own sequence (`LongestTextsFirst` for perplexity requests);
    with `equal_length_batches`, each batch holds rows of one length (`EqualLengthBatches`)."""
    key = bool(equal_length_batches)
    if key not in _PLAIN_LM:
        from lm_eval.models.huggingface import HFLM

        mixins = (EqualLengthBatches, LongestTextsFirst) if key else (LongestTextsFirst,)
        _PLAIN_LM[key] = type("EqualLengthHFLM" if key else "PlainHFLM", (*mixins, HFLM), {})
    return _PLAIN_LM[key]


def shared_context_lm_class():
    """lm-eval's HFLM with log-likelihood requests scored once per distinct context (built on first
    use, so that importing editlib does not import lm-eval).

    HFLM runs every (context, continuation) pair as its own sequence, so a k-choice item runs its
    few-shot context k times, and computes the output matrix and a log-softmax at every position.
    This subclass scores the requests with `editlib.eval.metrics.teacher_forced_ids`, as the edit
    metrics are scored: each distinct context runs once into a KV cache (batches of similar length,
    as many contexts as lm-eval's batch size, on CPU at most `CONTEXT_BATCH_TOKENS` padded tokens:
    thin products run as fast per token there), logits only where a continuation token is scored,
    the continuations' later tokens in one batch over the cached contexts. For a model whose output
    at a position depends only on the tokens up to it (any causal LM with its weights edited) the
    scores equal HFLM's up to float rounding. A GRACE-style adaptor that reads the sequence's last
    token is not such a model: evaluate it with HFLM itself (`lm_eval_results(..., share_contexts=False)`).
    Requests longer than the model's window, and seq2seq models, go to HFLM's own loop.
    """
    global _SHARED_CONTEXT_LM
    if _SHARED_CONTEXT_LM is not None:
        return _SHARED_CONTEXT_LM
    from lm_eval.models.huggingface import HFLM

    from editlib.eval.metrics import teacher_forced_ids
    from editlib.model.tokens import length_sorted_chunks, pad_id

    class SharedContextHFLM(LongestTextsFirst, HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            if self.backend != "causal":
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            fits = [len(ctx) + len(cont) <= self.max_length + 1 for _, ctx, cont in requests]
            results: list[tuple[float, bool] | None] = [None] * len(requests)
            overlong = [index for index, fit in enumerate(fits) if not fit]
            if overlong:
                scored = super()._loglikelihood_tokens([requests[i] for i in overlong], disable_tqdm, override_bs)
                for index, answer in zip(overlong, scored, strict=True):
                    results[index] = answer
            groups: dict[tuple[int, ...], list[int]] = {}
            for index, (_, ctx, cont) in enumerate(requests):
                if fits[index]:
                    assert len(ctx) > 0 and len(cont) > 0
                    groups.setdefault(tuple(ctx), []).append(index)
            contexts = list(groups)
            rows = self.batch_size if isinstance(self.batch_size, int) else 16  # "auto": a fixed 16
            budget = CONTEXT_BATCH_TOKENS if self.device.type == "cpu" else None
            bar = tqdm(total=sum(fits), disable=disable_tqdm or self.rank != 0,
                       desc="Running loglikelihood requests (one pass per context)")
            for chunk in length_sorted_chunks([len(c) for c in contexts], rows, budget):
                members = [index for u in chunk for index in groups[contexts[u]]]
                nlls, hits = teacher_forced_ids(self.model, [requests[i][1] for i in members],
                                                [requests[i][2] for i in members], pad_id(self.tokenizer),
                                                max_rows=len(chunk))
                for index, nll, hit in zip(members, nlls, hits, strict=True):
                    results[index] = answer = (-float(nll.sum()), bool(hit.all()))
                    if requests[index][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
                bar.update(len(members))
            bar.close()
            return results

    _SHARED_CONTEXT_LM = SharedContextHFLM
    return SharedContextHFLM


@contextlib.contextmanager
def _preserved_rng_and_mode(model: torch.nn.Module) -> Iterator[None]:
    """lm-eval seeds python/numpy/torch globally and HFLM calls model.eval(); undo both afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    was_training = model.training
    with torch.random.fork_rng():
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            model.train(was_training)


def make_task_manager(include_path: str | Path | Sequence[str | Path] | None = None, include_defaults: bool = False):
    """An lm-eval TaskManager over ``include_path``; with ``include_defaults`` it also indexes the
    ~15k bundled tasks (about 11 s, and their datasets need the hub)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not isinstance(include_path, (str, Path)):
        include_path = [str(p) for p in include_path]
    elif include_path is not None:
        include_path = str(include_path)
    if include_path is None and not include_defaults:
        raise ValueError("no tasks to index: give include_path or include_defaults=True")
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


UNSAFE_CODE_KEY = "downstream.confirm_run_unsafe_code"
CODE_EVAL_ENV = "HF_ALLOW_CODE_EVAL"  # read by the `evaluate` library's code_eval metric (mbpp, humaneval)


class UnsafeCodeTaskError(ValueError):
    """A task that lm-eval marks ``unsafe_code`` (its metric runs model-generated code) was
    requested without ``confirm_run_unsafe_code``."""


def _leaf_configs(task_manager, name: str) -> dict[str, dict]:
    """The leaf tasks under index entry ``name`` (a task, group or tag) with their YAML configs as
    lm-eval's task index parsed them (functions unresolved, nothing built or downloaded)."""
    from lm_eval.tasks._index import Kind

    index = task_manager.task_index
    leaves: dict[str, dict] = {}
    seen: set[str] = set()

    def visit(item) -> None:
        if isinstance(item, dict):  # a group's inline config: a subgroup, a new task, or overrides of one
            if "group" in item:
                children = item.get("task", [])
                for child in children if isinstance(children, list) else [children]:
                    visit(child)
            elif isinstance(item.get("task"), str) and item["task"] in index and "unsafe_code" not in item:
                visit(item["task"])
            else:
                leaves[str(item.get("task"))] = item
            return
        if item in seen or item not in index:
            return
        seen.add(item)
        entry = index[item]
        if entry.kind == Kind.GROUP:
            children = (entry.cfg or {}).get("task", [])
            for child in children if isinstance(children, list) else [children]:
                visit(child)
        elif entry.kind == Kind.TAG:
            for child in sorted(entry.tags):
                visit(child)
        else:
            leaves[item] = entry.cfg or {}

    visit(name)
    return leaves


def unsafe_code_tasks(task_manager, name: str) -> list[str]:
    """The leaf tasks of ``name`` (a task, group or tag) that lm-eval marks ``unsafe_code``."""
    return sorted(leaf for leaf, cfg in _leaf_configs(task_manager, name).items() if cfg.get("unsafe_code"))


def scores_whole_texts(task_manager, name: str) -> bool:
    """Whether a leaf task of ``name`` is a loglikelihood_rolling task (perplexity of whole texts)."""
    return any(cfg.get("output_type") == "loglikelihood_rolling" for cfg in _leaf_configs(task_manager, name).values())


@contextlib.contextmanager
def _code_eval_allowed(enabled: bool) -> Iterator[None]:
    """``HF_ALLOW_CODE_EVAL=1`` inside the block when ``enabled`` (the code_eval metric refuses to
    run without it; mbpp's utils even check it when lm-eval imports them to build the task), and
    the variable as it was afterwards."""
    if not enabled:
        yield
        return
    saved = os.environ.get(CODE_EVAL_ENV)
    os.environ[CODE_EVAL_ENV] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(CODE_EVAL_ENV, None)
        else:
            os.environ[CODE_EVAL_ENV] = saved


def _check_known(tasks: Sequence[str], task_manager, include_path, include_defaults: bool) -> None:
    known = set(task_manager.all_tasks)
    missing = [task for task in tasks if task not in known]
    if missing:
        hint = "" if include_defaults else " (standard lm-eval tasks need include_defaults=True)"
        raise ValueError(f"tasks not found: {missing}; indexed from include_path={include_path!r}{hint}")


def lm_eval_results(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool = False,
    task_manager=None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    seed: int = 1234,
    max_length: int | None = None,
    add_bos_token: bool | None = None,
    bootstrap_iters: int = 1000,
    log_samples: bool = False,
    offline: bool = True,
    share_contexts: bool = True,
    equal_length_batches: bool = False,
    confirm_run_unsafe_code: bool = False,
) -> dict:
    """Run ``lm_eval.simple_evaluate`` on the in-memory ``model`` and return lm-eval's raw result dict.

    Nothing is written to disk by lm-eval itself (no output path, no request or response cache);
    `datasets` writes its Arrow copy of each local task file under the task's ``cache_dir``.
    ``seed`` seeds python, numpy, torch and the few-shot sampler inside lm-eval; the caller's RNG
    states and the model's train/eval mode are restored afterwards. ``offline`` blocks hub
    access for the duration of the call (see `hub_offline`); standard task names need
    ``include_defaults=True`` and, for their datasets, ``offline=False``.
    ``num_fewshot=None`` keeps each task's own number of few-shot examples (BBH CoT's 3, mbpp's 3;
    0 for a task that sets none); an integer overrides it for every task whose config does not
    set 0 (lm-eval never overrides a configured 0).
    ``add_bos_token=None`` keeps the tokenizer's own behaviour (Llama-3 tokenizers prepend BOS).
    ``share_contexts`` scores each distinct context once (`shared_context_lm_class`); turn it off
    for a model whose output at a position depends on later tokens (GRACE).
    ``equal_length_batches`` (with ``share_contexts`` off) puts rows of one length in each batch
    (`EqualLengthBatches`), for a model that reads each row's last position (GRACE's codebook).
    A task that lm-eval marks ``unsafe_code`` (mbpp: its metric executes the generated code) is
    refused with `UnsafeCodeTaskError` unless ``confirm_run_unsafe_code``; with it, lm-eval gets
    the flag and ``HF_ALLOW_CODE_EVAL=1`` is set for the call only.
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks given")
    if share_contexts and equal_length_batches:
        raise ValueError("equal_length_batches applies to HFLM's own loop: pass share_contexts=False with it")
    with hub_offline(offline):
        import lm_eval

        if task_manager is None:
            task_manager = make_task_manager(include_path, include_defaults)
        _check_known(tasks, task_manager, include_path, include_defaults)
        if not confirm_run_unsafe_code:
            for task in tasks:
                if unsafe := unsafe_code_tasks(task_manager, task):
                    raise UnsafeCodeTaskError(
                        f"downstream task {task!r} executes model-generated code (lm-eval marks {unsafe} "
                        f"unsafe_code); to run it, set {UNSAFE_CODE_KEY}: true in the config "
                        f"(confirm_run_unsafe_code=True here), or remove {task!r} from downstream.tasks")
        with _preserved_rng_and_mode(model), _code_eval_allowed(confirm_run_unsafe_code):
            lm = (shared_context_lm_class() if share_contexts else plain_lm_class(equal_length_batches))(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=batch_size,
                max_length=max_length,
                add_bos_token=add_bos_token,
            )
            return lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=task_manager,
                num_fewshot=num_fewshot,
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                log_samples=log_samples,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                confirm_run_unsafe_code=confirm_run_unsafe_code,
            )


def _number_or_none(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _metric_entries(entries: dict) -> list[tuple[str, str, str]]:
    """(row metric label, metric, filter) of each "<metric>,<filter>" value key of a result entry:
    the filter is dropped from the label when it is "none", kept as "<metric>,<filter>" otherwise."""
    out = []
    for key in entries:
        if "," not in key or "_stderr," in key:
            continue
        metric, filter_name = key.split(",", 1)
        out.append((metric if filter_name == "none" else key, metric, filter_name))
    return out


def metric_rows(results: dict) -> list[dict]:
    """Every entry of lm-eval's ``results["results"]`` (tasks and groups alike) as tidy rows
    {task, metric, higher_is_better, value, stderr, n_items}; `task_rows` keeps groups and subtasks apart.

    lm-eval keys are "<metric>,<filter>" and "<metric>_stderr,<filter>"; the filter is dropped when
    it is "none" and kept as "<metric>,<filter>" otherwise. stderr is None where lm-eval has none.
    """
    rows = []
    n_samples = results.get("n-samples", {})
    for task, entries in results["results"].items():
        n_items = n_samples.get(task, {}).get("effective")
        for label, metric, filter_name in _metric_entries(entries):
            rows.append(
                {
                    "task": task,
                    "metric": label,
                    "higher_is_better": _higher_is_better(results, task, metric),
                    "value": _number_or_none(entries[f"{metric},{filter_name}"]),
                    "stderr": _number_or_none(entries.get(f"{metric}_stderr,{filter_name}")),
                    "n_items": n_items,
                }
            )
    return rows


def _higher_is_better(results: dict, task: str, metric: str) -> bool | None:
    """The metric's direction as lm-eval reports it (``results["higher_is_better"]``, set by each
    task's metric_list and propagated to groups): False for perplexities and bits per byte, which a
    mean accuracy must never average in; None where lm-eval says nothing."""
    direction = (results.get("higher_is_better") or {}).get(task, {}).get(metric)
    return bool(direction) if isinstance(direction, bool) else None


def ratio_stderr(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    """The standard error of r = sum(x) / sum(n) over m independently drawn items (x_i, n_i), by the
    delta method: var(r) = m / (m - 1) * sum((x_i - r n_i)^2) / sum(n)^2. None with fewer than two
    items or a sum(n) that is not positive."""
    x, n = np.asarray(numerators, float), np.asarray(denominators, float)
    if len(x) < 2 or n.sum() <= 0:
        return None
    m, r = len(x), x.sum() / n.sum()
    return math.sqrt(m / (m - 1) * float(((x - r * n) ** 2).sum())) / float(n.sum())


def ratio_metric_stderr(samples: Sequence[dict], metric: str) -> float | None:
    """The standard error of a ratio metric (`RATIO_METRICS`) over lm-eval's logged samples: with
    r = sum(ll) / sum(n) the log-likelihood per word (or byte) and se(r) its `ratio_stderr` over the
    texts, word and byte perplexity are exp(-r) (error exp(-r) se(r)), bits per byte -r / ln 2
    (error se(r) / ln 2). None with fewer than two texts or where the samples do not hold the metric."""
    pairs = np.array([sample[metric] for sample in samples if isinstance(sample.get(metric), (list, tuple))], float)
    if metric not in RATIO_METRICS or len(pairs) < 2:
        return None
    stderr = ratio_stderr(pairs[:, 0], pairs[:, 1])
    if stderr is None:
        return None
    per_unit = pairs[:, 0].sum() / pairs[:, 1].sum()
    return stderr / math.log(2) if metric == "bits_per_byte" else math.exp(-float(per_unit)) * stderr


def _size_weighted(leaf_rows: list[dict], name: str) -> list[dict]:
    """One row per metric over the leaf tasks that report it: lm-eval's size-weighted mean
    (`aggregate_subtask_metrics`) and pooled standard error (`pooled_sample_stderr`), as lm-eval
    aggregates a group whose ``aggregate_metric_list`` says ``weight_by_size: true`` (mmlu, bbh,
    hendrycks_math). Both assume a mean-aggregated metric (acc, exact_match, f1, pass@1 are)."""
    from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr

    rows = []
    for metric in dict.fromkeys(row["metric"] for row in leaf_rows):
        part = [row for row in leaf_rows if row["metric"] == metric and row["value"] is not None and row["n_items"]]
        if not part:
            continue
        sizes = [int(row["n_items"]) for row in part]
        value = float(aggregate_subtask_metrics([row["value"] for row in part], sizes, True))
        stderrs = [row["stderr"] for row in part]
        stderr = (float(pooled_sample_stderr(stderrs, sizes))
                  if None not in stderrs and sum(sizes) > len(sizes) else None)
        rows.append({"task": name, "metric": metric, "higher_is_better": part[0].get("higher_is_better"),
                     "value": value, "stderr": stderr, "n_items": sum(sizes)})
    return rows


def task_rows(results: dict, name: str) -> tuple[list[dict], list[dict]]:
    """The rows of requested task ``name`` from the lm-eval results of evaluating it alone:
    (one row {task, metric, value, stderr, n_items} per metric of ``name`` itself; one row
    {group, task, metric, value, stderr, n_items} per metric of each leaf task under it, empty
    for a plain task).

    - a plain task: its own metrics;
    - a group with an ``aggregate_metric_list`` (mmlu, bbh, hendrycks_math): lm-eval's aggregate
      (``results["groups"][name]``: the metrics and filters the group lists, with lm-eval's
      standard error, over ``sample_count`` items);
    - a group without one, or a tag (``tydiqa_goldp``): lm-eval reports no aggregate, so every
      metric of the leaf tasks is aggregated here with lm-eval's own helpers, size-weighted mean
      and pooled standard error (`_size_weighted`).
    Intermediate groups (mmlu's four categories) are not rows: the leaf tasks are.
    """
    entries = results["results"]
    group_subtasks = results.get("group_subtasks") or {}
    n_samples = results.get("n-samples", {})
    samples = results.get("samples") or {}
    leaves = [task for task in entries if task not in group_subtasks]

    def stderr(task: str, metric: str, filter_name: str) -> float | None:
        reported = _number_or_none(entries[task].get(f"{metric}_stderr,{filter_name}"))
        if reported is None and metric in RATIO_METRICS and task in samples:
            return ratio_metric_stderr([s for s in samples[task] if s.get("filter", filter_name) == filter_name], metric)
        return reported

    leaf_rows = [
        {"group": name, "task": task, "metric": label, "higher_is_better": _higher_is_better(results, task, metric),
         "value": _number_or_none(entries[task][f"{metric},{filter_name}"]),
         "stderr": stderr(task, metric, filter_name),
         "n_items": n_samples.get(task, {}).get("effective", entries[task].get("sample_len"))}
        for task in leaves for label, metric, filter_name in _metric_entries(entries[task])
    ]
    if leaves == [name]:  # a plain task
        keep = ("task", "metric", "higher_is_better", "value", "stderr", "n_items")
        return [{key: row[key] for key in keep} for row in leaf_rows], []
    aggregated = (results.get("groups") or {}).get(name)
    if aggregated is not None:
        counts = aggregated.get("sample_count") or {}
        main = [{"task": name, "metric": label, "higher_is_better": _higher_is_better(results, name, metric),
                 "value": _number_or_none(aggregated[f"{metric},{filter_name}"]),
                 "stderr": _number_or_none(aggregated.get(f"{metric}_stderr,{filter_name}")),
                 "n_items": counts.get(f"{metric},{filter_name}", aggregated.get("sample_len"))}
                for label, metric, filter_name in _metric_entries(aggregated)]
    else:
        main = _size_weighted(leaf_rows, name)
    return main, leaf_rows


def item_rows(results: dict) -> list[dict]:
    """Per-item rows {task, doc_id, answer, prediction, correct, loglikelihoods} of the
    multiple-choice tasks in ``results`` (which must come from ``log_samples=True``)."""
    if "samples" not in results:
        raise ValueError("results carry no samples: run lm_eval_results(..., log_samples=True)")
    rows = []
    for task, samples in results["samples"].items():
        for sample in samples:
            loglikelihoods = [float(resp[0]) for resp in sample["filtered_resps"]]
            prediction = int(np.argmax(loglikelihoods))
            rows.append(
                {
                    "task": task,
                    "doc_id": int(sample["doc_id"]),
                    "answer": int(sample["target"]),
                    "prediction": prediction,
                    "correct": prediction == int(sample["target"]),
                    "loglikelihoods": loglikelihoods,
                }
            )
    return rows


# ---------------------------------------------------------------------------- paired changes

_REPRODUCE_TOLERANCE = 1e-9  # relative: per-item values must give the row's value to float rounding


def _label_parts(label: str) -> tuple[str, str]:
    """(metric, filter) of a row's metric label (`_metric_entries`): "acc" -> ("acc", "none")."""
    metric, _, filter_name = label.partition(",")
    return metric, filter_name or "none"


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _REPRODUCE_TOLERANCE * max(1.0, abs(a), abs(b))


def item_values(samples: Sequence[dict], label: str, value: float | None) -> dict[int, tuple[float, ...]] | None:
    """Per item (doc_id) of one task's logged lm-eval samples, what the row of metric `label`
    aggregates: (score,) for a metric lm-eval averages over items (acc, acc_norm, exact_match), or
    (log-likelihood, words or bytes) for a `LOG_CHANGE_METRICS` perplexity. None where the values
    are neither (a corpus-level metric such as bleu, bits_per_byte) or do not give the row's
    `value` again (a metric aggregated otherwise than by the mean), so that nothing is paired on a
    misread."""
    metric, filter_name = _label_parts(label)
    items: dict[int, tuple[float, ...]] = {}
    for sample in samples:
        if sample.get("filter", filter_name) != filter_name or metric not in sample:
            continue
        raw = sample[metric]
        if metric in LOG_CHANGE_METRICS and isinstance(raw, (list, tuple)) and len(raw) == 2:
            items[int(sample["doc_id"])] = (float(raw[0]), float(raw[1]))
        elif metric not in RATIO_METRICS and isinstance(raw, (bool, int, float, np.number)):
            items[int(sample["doc_id"])] = (float(raw),)
        else:
            return None
    if len(items) < 2 or value is None:
        return None
    pairs = np.array(list(items.values()))
    if metric in LOG_CHANGE_METRICS:
        reproduced = math.exp(-pairs[:, 0].sum() / pairs[:, 1].sum()) if pairs[:, 1].sum() > 0 else math.nan
    else:
        reproduced = float(pairs[:, 0].mean())
    return items if _close(reproduced, value) else None


def matched_proportions_stderr(before: np.ndarray, after: np.ndarray) -> float:
    """The standard error of the change of a proportion measured twice on the same n items (0/1
    scores), as Agresti and Min (2005) give it for matched pairs: half an item added to each cell
    of the 2x2 table of before and after, so that b items lost and c gained (b + 0.5 and c + 0.5 of
    n + 2) give sqrt((b + c + 1) - (c - b)^2 / (n + 2)) / (n + 2). Unlike sd(after - before) /
    sqrt(n), it is not 0 when no item changed, and it does not call a handful of changes in one
    direction significant (4 of 100 lost: the exact sign test's p is 0.125)."""
    n = len(before)
    lost = float(np.sum((before == 1) & (after == 0))) + 0.5
    gained = float(np.sum((before == 0) & (after == 1))) + 0.5
    return math.sqrt(lost + gained - (gained - lost) ** 2 / (n + 2)) / (n + 2)


def item_change_stderr(reference: dict[int, tuple[float, ...]], current: dict[int, tuple[float, ...]],
                       metric: str) -> float | None:
    """The standard error of the change of a metric from `reference` to `current`, paired item by
    item (both `item_values` of the same items): for 0/1 scores (acc, exact_match)
    `matched_proportions_stderr`; for another mean metric sd(current - reference) / sqrt(n); for a
    `LOG_CHANGE_METRICS` perplexity that of the change of its log, the `ratio_stderr` of the
    per-text log-likelihood differences over the words (or bytes). None when the two did not
    score the same items (or the same words of each text)."""
    if reference.keys() != current.keys() or len(reference) < 2:
        return None
    ids = sorted(reference)
    a, b = np.array([reference[i] for i in ids]), np.array([current[i] for i in ids])
    if a.shape != b.shape:
        return None
    if metric in LOG_CHANGE_METRICS:
        if not np.array_equal(a[:, 1], b[:, 1]):
            return None
        return ratio_stderr(b[:, 0] - a[:, 0], a[:, 1])
    if np.isin(a[:, 0], (0.0, 1.0)).all() and np.isin(b[:, 0], (0.0, 1.0)).all():
        return matched_proportions_stderr(a[:, 0], b[:, 0])
    return float(np.std(b[:, 0] - a[:, 0], ddof=1) / math.sqrt(len(ids)))


def _group_change_stderr(row: dict, leaves: list[dict]) -> float | None:
    """A group row's paired standard error from its leaf rows' (`change_stderr`, value, n_items):
    the group's value is a weighted mean of its leaves' (by size, as mmlu's, or plain, as a group
    without weight_by_size), whichever reproduces the row's value, and so is its change; None when
    neither does or a leaf has no paired error."""
    if not leaves or any(leaf.get("change_stderr") is None or not leaf.get("n_items") for leaf in leaves):
        return None
    values = np.array([leaf["value"] for leaf in leaves], float)
    sizes = np.array([leaf["n_items"] for leaf in leaves], float)
    errors = np.array([leaf["change_stderr"] for leaf in leaves], float)
    for weights in (sizes / sizes.sum(), np.full(len(leaves), 1 / len(leaves))):
        if row.get("value") is not None and _close(float(weights @ values), row["value"]):
            return float(np.sqrt((weights ** 2) @ (errors ** 2)))
    return None


def with_change_stderr(rows: Sequence[dict], reference: dict[tuple[str, str], dict[int, tuple[float, ...]]]
                       ) -> list[dict]:
    """`evaluate_downstream` rows made with ``items=True``, each given `change_stderr`: the standard
    error of its value's change from the `reference` model's on the same task and metric, paired
    item by item (`item_change_stderr`; `reference`: {(task, metric): items}, `item_table` read by
    `items_by_task`), for a group from its leaves (`_group_change_stderr`); None where either side
    has no usable per-item values. The rows' ``items`` are dropped."""
    out = []
    for row in rows:
        row = dict(row)
        current, key = row.pop("items", None), (row.get("task"), row.get("metric"))
        before = reference.get(key)
        row["change_stderr"] = (item_change_stderr(before, current, _label_parts(row["metric"])[0])
                                if current is not None and before is not None else None)
        out.append(row)
    for row in out:
        if "group" not in row and row.get("metric") is not None and row["change_stderr"] is None:
            leaves = [leaf for leaf in out if leaf.get("group") == row["task"] and leaf["metric"] == row["metric"]]
            row["change_stderr"] = _group_change_stderr(row, leaves)
    return out


ITEM_COLUMNS = ["task", "metric", "doc_id", "value", "count"]


def item_table(rows: Sequence[dict]):
    """The per-item values of `evaluate_downstream` rows made with ``items=True`` as a tidy frame
    (`ITEM_COLUMNS`: one row per task, metric and item; `count` the words or bytes of a perplexity's
    text, empty otherwise), to pair a later evaluation with (`items_by_task`)."""
    import pandas as pd

    records = [{"task": row["task"], "metric": row["metric"], "doc_id": doc_id, "value": values[0],
                "count": values[1] if len(values) > 1 else None}
               for row in rows if row.get("items") for doc_id, values in row["items"].items()]
    return pd.DataFrame(records, columns=ITEM_COLUMNS)


def items_by_task(table) -> dict[tuple[str, str], dict[int, tuple[float, ...]]]:
    """{(task, metric): {doc_id: values}} of an `item_table` (an empty table: {})."""
    out: dict[tuple[str, str], dict[int, tuple[float, ...]]] = {}
    if table.empty:
        return out
    for (task, metric), part in table.groupby(["task", "metric"], sort=False):
        counts = part["count"]
        values = (zip(part["value"].astype(float), counts.astype(float)) if counts.notna().all()
                  else ((v,) for v in part["value"].astype(float)))
        out[(task, metric)] = {int(doc_id): tuple(v) for doc_id, v in zip(part["doc_id"], values)}
    return out


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip()


def evaluate_downstream(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str],
    include_path: str | Path | Sequence[str | Path] | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    seed: int = 1234,
    *,
    include_defaults: bool = False,
    task_manager=None,
    max_length: int | None = None,
    add_bos_token: bool | None = None,
    offline: bool = True,
    share_contexts: bool = True,
    equal_length_batches: bool = False,
    confirm_run_unsafe_code: bool = False,
    items: bool = False,
) -> list[dict]:
    """Evaluate the in-memory ``model`` on lm-eval ``tasks``, each task (a group or tag counts as
    one) in its own lm-eval call, so that one failing task leaves the others' results standing.

    Returns the rows of `task_rows` for every task, in order: rows {task, metric, value, stderr,
    n_items, error} (``error`` None) for the task itself, then rows {group, task, metric, value,
    stderr, n_items} for the leaf tasks of a group or tag (the rows with a ``group`` key). A task
    whose evaluation raised is logged with its traceback and gives one row {task, metric None,
    value None, stderr None, n_items None, error: "<exception type>: <message>"}.
    Task names are checked before anything runs: an unknown name raises ValueError.
    Local tasks (written by `write_mc_task` / `write_glue_eval_task`) are found under
    ``include_path`` with the bundled task index off; pass one ``task_manager``
    (`make_task_manager`) to several calls to index the tasks once; see `lm_eval_results` for the
    other arguments.
    With ``items``, every row of a plain task or a leaf task carries ``items``: its `item_values`
    (None where lm-eval's per-item values do not give the row's value), from which
    `with_change_stderr` pairs two evaluations and `item_table` keeps them.
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks given")
    if task_manager is None:
        with hub_offline(offline):
            task_manager = make_task_manager(include_path, include_defaults)
    _check_known(tasks, task_manager, include_path, include_defaults)
    rows: list[dict] = []
    for task in tasks:
        try:
            results = lm_eval_results(
                model,
                tokenizer,
                [task],
                include_path=include_path,
                include_defaults=include_defaults,
                task_manager=task_manager,
                limit=limit,
                batch_size=batch_size,
                num_fewshot=num_fewshot,
                seed=seed,
                max_length=max_length,
                add_bos_token=add_bos_token,
                offline=offline,
                share_contexts=share_contexts,
                equal_length_batches=equal_length_batches,
                confirm_run_unsafe_code=confirm_run_unsafe_code,
                # the ratio metrics' standard errors, and the per-item values
                log_samples=items or scores_whole_texts(task_manager, task),
            )
            main, subtasks = task_rows(results, task)
            if items:
                samples = results["samples"]
                for row in (subtasks or main):
                    row["items"] = item_values(samples.get(row["task"], []), row["metric"], row["value"])
        except Exception as error:  # noqa: BLE001 (any task failure becomes that task's error row)
            log.error("downstream task %r failed; its row records the error, the other tasks go on:\n%s",
                      task, traceback.format_exc())
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # after an out-of-memory error, before the next task
            rows.append({"task": task, "metric": None, "value": None, "stderr": None, "n_items": None,
                         "error": _error_text(error)})
            continue
        if not main:
            log.warning("downstream task %r reported no metric", task)
        rows += [{**row, "error": None} for row in main] + subtasks
    return rows
