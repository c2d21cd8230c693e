"""The Python API: edit a Hugging Face causal LM from a notebook (README, "Python API").

    model, tok = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    requests = [Request("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", target_true="Paris")]
    C = second_moments(model, tok, [2, 3, 4], corpus="texts.jsonl", cache_dir="stats")
    editor = open_editor(model, tok, "memit", layers=[2, 3, 4], second_moments=C)
    editor.apply(requests); evaluate(model, tok, requests); editor.save("edit.safetensors"); editor.restore()
    load_edit(fresh_model, tok, "edit.safetensors", second_moments=C)

Everything here is a thin layer over the library: requests become editlib.data.records.EditRequest,
sessions are opened through the method registry (editlib.methods.registry: make_spec, then the
method's `open` on an editlib.study.experiments.ExperimentContext), statistics come from
editlib.editing.statistics (its per-layer, content-keyed cache), metrics from editlib.eval.metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from editlib.data.records import EditRequest, RecordError, validate_request
from editlib.editing.session import EditSession

log = logging.getLogger(__name__)

EDIT_FORMAT = "editlib.edit/1"  # the `format` metadata of a file written by Session.save


class MissingStatisticsError(ValueError):
    """A method that needs the second moments C of its layers was opened without them."""


# ---------------------------------------------------------------------------- requests


def _prompts(value: str | Iterable[str], name: str, where: str) -> tuple[str, ...]:
    values = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise RecordError(f"{where}: {name} must be non-empty strings, got {values!r}")
    return values


@dataclass(frozen=True)
class Request:
    """One fact to edit: `prompt` (plain text that contains `subject` verbatim) should continue
    with `target` (the new object, without a leading space).

    Optional, for `evaluate`: `target_true` (the object the model knows; with it the metrics are
    CounterFact's probability comparisons ES/PS/NS, without it teacher-forced token accuracy of
    `target`), `paraphrase_prompts` (other wordings of the prompt: PS) and `neighborhood_prompts`
    (prompts about other subjects that the edit must leave alone: NS; without `target_true` each
    needs its expected answer in `neighborhood_answers`). `case_id` names the request in results
    and errors (default: its position in the list it is passed in).
    """

    prompt: str
    subject: str
    target: str
    target_true: str | None = None
    paraphrase_prompts: Sequence[str] = ()
    neighborhood_prompts: Sequence[str] = ()
    neighborhood_answers: Sequence[str] = ()
    case_id: int | str | None = None

    def __post_init__(self):
        where = self._where()
        for name in ("prompt", "subject", "target"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise RecordError(f"{where}: {name} must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers"):
            object.__setattr__(self, name, _prompts(getattr(self, name), name, where))
        self.edit_request(0)  # the subject is in the prompt and every field is valid

    def _where(self) -> str:
        name = f"case_id={self.case_id!r}, " if self.case_id is not None else ""
        return f"Request({name}prompt={self.prompt!r}, subject={self.subject!r})"

    @property
    def template(self) -> str:
        """The prompt with its first occurrence of the subject replaced by "{}" (EditRequest.prompt)."""
        where = self._where()
        if self.prompt.count("{}") == 1 and self.prompt.count("{") == 1 and self.prompt.count("}") == 1:
            return self.prompt  # already a template ("{} is located in")
        if "{" in self.prompt or "}" in self.prompt:
            raise RecordError(f"{where}: the prompt may not contain braces")
        if self.subject not in self.prompt:
            raise RecordError(f"{where}: the subject {self.subject!r} does not occur in the prompt "
                              "(it must appear verbatim, in the same case)")
        return self.prompt.replace(self.subject, "{}", 1)

    def edit_request(self, case_id: int | str | None = None) -> EditRequest:
        """The library's EditRequest (validated); `case_id` is used when the request has none."""
        request = EditRequest(
            case_id=self.case_id if self.case_id is not None else case_id,
            prompt=self.template,
            subject=self.subject,
            target_new=self.target,
            target_true=self.target_true,
            paraphrase_prompts=self.paraphrase_prompts,
            neighborhood_prompts=self.neighborhood_prompts,
            neighborhood_answers=self.neighborhood_answers,
            source="counterfact" if self.target_true is not None else "zsre",
        )
        validate_request(request, self._where())
        return request


def edit_requests(requests: Request | EditRequest | Iterable[Request | EditRequest], start: int = 0) -> list[EditRequest]:
    """EditRequests of one request or a list (a Request without case_id gets start + its index);
    case ids must be unique."""
    items = [requests] if isinstance(requests, (Request, EditRequest)) else list(requests)
    converted, seen = [], {}
    for index, item in enumerate(items):
        if isinstance(item, Request):
            request = item.edit_request(start + index)
        elif isinstance(item, EditRequest):
            request = item
        else:
            raise TypeError(f"request {index}: expected editlib.Request (or EditRequest), got {type(item).__name__}")
        if request.case_id in seen:
            raise ValueError(f"request {index}: case_id {request.case_id!r} is also request {seen[request.case_id]}'s")
        seen[request.case_id] = index
        converted.append(request)
    return converted


# ---------------------------------------------------------------------------- models


def load_model(name_or_path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device | None = None,
               revision: str | None = None):
    """(model, tokenizer) of a hub id or local folder (editlib.model.loading.load_model): weights
    in `dtype` on `device` (default: CUDA when available, else CPU), eval mode, parameters frozen,
    a pad token set (EOS) where the tokenizer has none."""
    from editlib.model.loading import load_model as load

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load(str(name_or_path), dtype=dtype, device=device, revision=revision)


# ---------------------------------------------------------------------------- statistics


def default_cache_dir() -> Path:
    """$EDITLIB_CACHE, else ~/.cache/editlib."""
    return Path(os.environ.get("EDITLIB_CACHE") or Path.home() / ".cache" / "editlib")


def _corpus(corpus, n_samples: int | None, seed: int, text_field: str, cache_dir: Path):
    """The editlib.data.corpus.Corpus of `corpus` (texts, a .jsonl/.txt path or an "hf:" spec);
    a hub dataset's sample is kept in cache_dir/corpora so that later calls do not stream it again."""
    from editlib.data.corpus import corpus_of, load_corpus, read_prepared, sample_hf, write_corpus
    from editlib.io import content_key

    if isinstance(corpus, (list, tuple)):
        if not all(isinstance(text, str) for text in corpus):
            raise TypeError("corpus: a list of texts must hold strings only")
        texts = list(corpus)[:n_samples] if n_samples is not None else list(corpus)
        return corpus_of("<texts>", texts)
    if not isinstance(corpus, (str, Path)):
        raise TypeError(f"corpus must be a list of texts, a .jsonl/.txt file or 'hf:<dataset>[:<config>[:<split>]]', "
                        f"got {type(corpus).__name__}")
    spec = str(corpus)
    if spec.startswith("hf:"):
        if n_samples is None:
            raise ValueError(f"corpus {spec}: a hub dataset needs n_samples (how many documents to sample)")
        key = content_key({"corpus": spec, "n_samples": n_samples, "seed": seed, "text_field": text_field})
        path = cache_dir / "corpora" / f"{key}.jsonl"
        if path.is_file():
            return read_prepared(path, spec)
        sample = sample_hf(spec, n_samples, seed, text_field)
        write_corpus(path, sample)
        return sample
    if not Path(spec).is_file():
        raise FileNotFoundError(f"corpus file not found: {spec} (a corpus is a list of texts, a .jsonl file with a "
                                f"{text_field!r} field, a .txt file of blank-line separated documents, or "
                                "'hf:<dataset>[:<config>[:<split>]]')")
    return load_corpus(spec, n_samples, seed, text_field)


def second_moments(model, tokenizer, layers: int | Sequence[int], corpus: str | Path | Sequence[str],
                   n_samples: int | None = None, cache_dir: str | Path | None = None, *, seed: int = 1,
                   text_field: str = "text", max_length: int | None = None, dtype: str = "float64",
                   progress: bool = True) -> dict[int, torch.Tensor]:
    """C = E[k k^T] of the edited module's input at each of `layers`, over a text corpus:
    {layer: C (float32, on the CPU)}, what open_editor's `second_moments` takes.

    `corpus`: a list of texts (the first `n_samples`, or all), a local .jsonl (field `text_field`)
    or .txt file (documents separated by blank lines; `n_samples` of them drawn with `seed`, or
    all), or a hub dataset "hf:<path>[:<config>[:<split>]]" (streamed once; `n_samples` rows
    drawn with `seed`, kept in `cache_dir`/corpora). Blank documents are skipped. Documents are cut
    at `max_length` tokens (default 1024); sums are accumulated in `dtype`.

    Each layer's C is cached in `cache_dir` (default $EDITLIB_CACHE or ~/.cache/editlib, under
    second_moments/) under a key of the model's weights, the layer, the corpus' exact documents,
    their number, `max_length` and `dtype` (editlib.editing.statistics.layer_second_moments), so a
    second call, or a later call with some of the same layers, loads instead of recomputing.
    """
    from editlib.data.corpus import corpus_of
    from editlib.editing.statistics import StatsConfig, layer_second_moments
    from editlib.model.layout import model_layout

    layers = [int(layers)] if isinstance(layers, int) else [int(layer) for layer in layers]
    if not layers:
        raise ValueError("second_moments: no layers given")
    layout = model_layout(model)
    for layer in layers:
        layout.check_layer(layer)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sample = _corpus(corpus, n_samples, seed, text_field, root)
    kept = [text for text in sample.texts if text.strip()]
    if not kept:
        raise ValueError(f"corpus {sample.name}: no non-blank documents")
    if len(kept) < len(sample.texts):
        sample = corpus_of(sample.name, kept)
    config = StatsConfig(max_length=max_length or StatsConfig.max_length, dtype=dtype)
    moments = layer_second_moments(model, tokenizer, layout, layers, sample, root / "second_moments", config, progress)
    count = next(iter(moments.values())).count
    width = next(iter(moments.values())).total.shape[0]
    if count < 2 * width:
        log.warning("second moments from %d tokens for keys of width %d: C may be singular or ill-conditioned "
                    "(MEMIT, EMMET and AlphaEdit solve with it); use a larger corpus or n_samples", count, width)
    return {layer: moment.mean.float() for layer, moment in moments.items()}


# ---------------------------------------------------------------------------- sessions

# model -> weak reference to the session last opened on it (evaluate scores inside its `scoring`
# context, which GRACE needs); weak both ways, so neither keeps the other alive
_OPEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _open_session(model) -> "Session | None":
    reference = _OPEN.get(model)
    return reference() if reference is not None else None


class Session(EditSession):
    """An open edit of one model by one method (an editlib EditSession, wrapping the method's own).

    apply(requests): edit `Request`s (or EditRequests) in, as one batch, on top of earlier ones;
    restore(): the model exactly as when the session opened; save(path) / load(path): the edits as
    a safetensors file, re-applied bit for bit on the same unedited model; close(): restore and
    detach. `inner` is the method's session (e.g. editlib.editing.editor.Editor), whose other
    attributes are reachable here too.
    """

    def __init__(self, inner: EditSession, spec, method: str, hyperparameters: dict, trained_editor: str | None,
                 model, fingerprint: str):
        self.inner, self.spec, self.method = inner, spec, method
        try:  # as save writes them and load reads them back (tuples become lists)
            self.hyperparameters = json.loads(json.dumps(hyperparameters))
        except TypeError as error:
            raise TypeError(f"{method}: hyperparameters must be JSON values (numbers, strings, lists, dicts): {error}") from None
        self.trained_editor = trained_editor
        self.model, self.fingerprint = model, fingerprint
        _OPEN[model] = weakref.ref(self)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.spec.layers)

    @property
    def n_edits(self) -> int:  # type: ignore[override]
        return self.inner.n_edits

    @property
    def scores_prompts_once(self) -> bool:  # type: ignore[override]
        return self.inner.scores_prompts_once

    def __getattr__(self, name: str):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"<editlib.Session {self.method} layers={list(self.layers)} n_edits={self.n_edits}>"

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def apply(self, requests) -> dict:
        """Edit `requests` (a Request or a list) into the model as one batch; returns the method's report."""
        return self.inner.apply(edit_requests(requests, start=self.n_edits))

    def restore(self) -> None:
        self.inner.restore()

    def close(self) -> None:
        self.inner.close()
        if _open_session(self.model) is self:
            del _OPEN[self.model]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state)

    def scoring(self, requests):
        return self.inner.scoring(edit_requests(requests))

    def one_at_a_time(self, requests):
        return self.inner.one_at_a_time(edit_requests(requests))

    def save(self, path: str | Path) -> Path:
        """Write the current edits (the method's state_dict) and what opened the session (method,
        layers, hyperparameters, the unedited model's fingerprint) to a safetensors file."""
        from editlib.io import save_tensors

        metadata = {"format": EDIT_FORMAT, "method": self.method, "layers": json.dumps(list(self.layers)),
                    "hyperparameters": json.dumps(self.hyperparameters), "trained_editor": self.trained_editor or "",
                    "model_fingerprint": self.fingerprint, "n_edits": str(self.n_edits)}
        save_tensors(path, self.state_dict(), metadata)
        return Path(path)

    def load(self, path: str | Path) -> "Session":
        """Replace the current edits by those saved at `path` (by `save`, from a session of the same
        method and layers on the same unedited model); the weights come out bit-identical."""
        from editlib.io import load_tensors

        state, metadata = load_tensors(path)
        saved = read_edit_metadata(path, metadata)
        if (saved["method"], tuple(saved["layers"])) != (self.method, self.layers):
            raise ValueError(f"{path}: an edit by {saved['method']} on layers {saved['layers']}; this session is "
                             f"{self.method} on layers {list(self.layers)} (load_edit opens the right one)")
        if saved["model_fingerprint"] != self.fingerprint:
            raise ValueError(f"{path}: saved for a model with fingerprint {saved['model_fingerprint']}, but this session's "
                             f"unedited model has {self.fingerprint}: another model, or one already edited")
        if saved["hyperparameters"] != self.hyperparameters:
            log.warning("%s: saved with hyperparameters %s, this session has %s (they matter for further edits only)",
                        path, saved["hyperparameters"], self.hyperparameters)
        self.inner.restore()
        self.inner.load_state_dict(state)
        return self


def read_edit_metadata(path: str | Path, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """method, layers, hyperparameters, trained_editor, model_fingerprint, n_edits of a saved edit."""
    from editlib.io import read_metadata

    meta = metadata if metadata is not None else read_metadata(path)
    if meta.get("format") != EDIT_FORMAT:
        raise ValueError(f"{path}: not an edit saved by editlib's Session.save (format {meta.get('format')!r})")
    return {"method": meta["method"], "layers": [int(layer) for layer in json.loads(meta["layers"])],
            "hyperparameters": json.loads(meta["hyperparameters"]), "trained_editor": meta["trained_editor"] or None,
            "model_fingerprint": meta["model_fingerprint"], "n_edits": int(meta["n_edits"])}


def _layer_tuple(layers) -> tuple[int, ...]:
    return (int(layers),) if isinstance(layers, int) else tuple(int(layer) for layer in layers)


def open_editor(model, tokenizer, method: str, layers: int | Sequence[int] | None = None,
                second_moments: dict[int, torch.Tensor] | None = None, *, trained_editor: str | Path | None = None,
                progress: bool = True, **hyperparameters) -> Session:
    """An editing session of `method` on `model` (a Session; the model stays unedited until apply).

    Methods: rome, r-rome (one layer), memit, emmet, alphaedit (need `second_moments` of their
    layers: call second_moments first), grace (one layer; its codebook wraps that layer's MLP
    output projection), mend (needs `trained_editor`, the path of a hypernetwork trained and saved
    by editlib.methods.mend, e.g. by the workflow's train_mend rule; its layers come from it).
    `layers` default to those of `second_moments`. `hyperparameters` are the method's
    (docs/methods.md §11; e.g. mom2_update_weight=1500.0, targets={"v_num_grad_steps": 10}), on top
    of the method's defaults. The model is put in eval mode with its parameters frozen.
    """
    from editlib.methods.registry import get_method, make_spec
    from editlib.model.loading import model_fingerprint
    from editlib.study.experiments import ExperimentContext

    entry = get_method(method)
    if entry.trained_editor:
        if trained_editor is None:
            raise ValueError(f"{method} edits with a trained hypernetwork: pass trained_editor=<its .safetensors file> "
                             "(training one is the workflow's train_mend rule, not part of this API)")
        if layers is not None:
            raise ValueError(f"{method}: the layers come from the trained editor; leave `layers` out")
        layers = ()
    elif trained_editor is not None:
        raise ValueError(f"{method} takes no trained_editor")
    elif layers is None:
        if not second_moments:
            raise ValueError(f"{method}: pass layers=[...], the layers to edit")
        layers = sorted(second_moments)
    layers = _layer_tuple(layers)
    moments = {int(layer): c for layer, c in (second_moments or {}).items()}
    spec = make_spec(method, hyperparameters, layers, str(trained_editor) if trained_editor is not None else None)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    fingerprint = model_fingerprint(model)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    ctx = ExperimentContext(model, tokenizer, name, moments, progress=progress)
    missing = [layer for layer in layers if layer not in moments] if entry.uses_statistics else []
    try:
        inner = entry.open(ctx, spec)
    except ValueError as error:
        if missing:
            raise MissingStatisticsError(
                f"{method} needs the second moments C of layers {missing}: C = editlib.second_moments(model, tokenizer, "
                f"{list(layers)}, corpus=...), then open_editor(..., second_moments=C) ({error})") from error
        raise
    return Session(inner, spec, method, hyperparameters, str(trained_editor) if trained_editor is not None else None,
                   model, fingerprint)


def load_edit(model, tokenizer, path: str | Path, second_moments: dict[int, torch.Tensor] | None = None, *,
              trained_editor: str | Path | None = None, progress: bool = True) -> Session:
    """A session of the method, layers and hyperparameters an edit was saved with (Session.save),
    on `model` (the same unedited model), with the saved edits applied: bit-identical weights.
    Methods that need second moments need them here too (to edit further); MEND's hypernetwork
    is read from where it was when the edit was saved, or from `trained_editor`."""
    saved = read_edit_metadata(path)
    trained_editor = trained_editor if trained_editor is not None else saved["trained_editor"]
    layers = None if trained_editor is not None else saved["layers"]
    session = open_editor(model, tokenizer, saved["method"], layers, second_moments, trained_editor=trained_editor,
                          progress=progress, **saved["hyperparameters"])
    try:
        return session.load(path)
    except Exception:
        session.close()
        raise


# ---------------------------------------------------------------------------- metrics


def evaluate(model, tokenizer, requests, session: EditSession | None = None, *, intervals: bool = False,
             per_request: bool = False):
    """The edit metrics of `requests` on the model as it is now (editlib.eval.metrics), x100.

    With target_true (CounterFact): ES, PS, NS (how often the new object beats the true one on the
    prompt, its paraphrases, and is beaten on the neighbourhood prompts), S their harmonic mean,
    EM, PM, NM the probability gaps. Without (ZsRE-style): ES, PS, NS are teacher-forced token
    accuracies (of the target; of the neighbourhood answers). A metric without prompts to score is
    left out. `intervals` adds 95% bootstrap intervals over requests (`<metric>_lo`/`_hi`);
    `per_request` returns a DataFrame of each request's metrics instead.

    Scoring runs inside the scoring context of `session` (default: the session last opened on
    this model by open_editor), which GRACE needs to see its edits.
    """
    import math

    from editlib.eval.metrics import edit_metrics, edit_scores, per_record_metrics

    batch = edit_requests(requests)
    if not batch:
        raise ValueError("evaluate: no requests")
    if len({request.source for request in batch}) > 1:
        raise ValueError("evaluate: give every request a target_true (CounterFact metrics) or none (token accuracy)")
    if session is None:
        session = _open_session(model)
    scoring = session.scoring(batch) if session is not None else contextlib.nullcontext()
    with scoring:
        scores = edit_scores(model, tokenizer, batch, share_prompts=session.scores_prompts_once if session else True)
    if per_request:
        return per_record_metrics(scores).dropna(axis=1, how="all")
    metrics = edit_metrics(scores, n_boot=1000 if intervals else 0)
    return {name: value for name, value in metrics.items() if not math.isnan(value)}
