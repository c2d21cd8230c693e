"""What each workflow job reads: the slice of config a stage hashes (`stage_config`) and the
accessors the Snakefile and the jobs share (models, runs, layers, counts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Keys of a method's config block that are not hyperparameters of the method itself (`pinned`: a
# trained editor shipped with the repository, editlib.study.pinned_editor).
NON_HPARAM_KEYS = {"method", "layers", "n_train", "n_eval", "hparams", "pinned"}



def deep_merge(base: dict, override: dict) -> dict:
    """`base` with `override`'s values, nested dicts merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged

def sensitivity_methods(config: dict) -> list[str]:
    """The method blocks of the sensitivity stage (the keys of experiments.sensitivity.grid)."""
    return list(config["experiments"].get("sensitivity", {}).get("grid", {}))


# ---------------------------------------------------------------------------- what each stage reads

STAGES = ("prepare_data", "prepare_model", "statistics", "causal_trace", "train_mend", "layer_sweep",
          "sensitivity", "single", "batched", "sequential", "downstream_base", "downstream_batched", "downstream_sequential", "report",
          "figures")


def stage_config(config: dict, stage: str, method: str | None = None) -> dict:
    """Exactly the part of `config` that `stage` reads (for `method`, where it has one).

    Each rule passes this as its `params.stage` and its script hands it to the stage function in
    editlib.study.pipeline instead of the whole config; Snakemake reruns a job when its params change,
    so changing a config value reruns the jobs that read it and no others.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if stage in ("report", "figures"):  # findings and figures; only the figures job reads `figures`
        part = {"run": config["run"], **({"ablations": config["ablations"]} if config.get("ablations") else {})}
        return {**part, "figures": config["figures"]} if stage == "figures" and config.get("figures") else part
    model = config["model"]
    loaded = {key: model[key] for key in ("dtype", "device", "tf32") if key in model}  # how the prepared model is loaded
    part: dict[str, Any] = {"seed": config["seed"], "model": loaded}
    if stage == "prepare_model":
        part["model"] = model
        if model["source"] == "toyworld":
            part["model_cache"] = config.get("model_cache", ".cache/models")
            if model.get("pinned"):  # re-pinned files (a new manifest) rerun the job
                from editlib.toy.pinned import manifest_sha256

                part["pinned_manifest_sha256"] = manifest_sha256(model["pinned"])
        if model["source"] == "smollm2":
            part["asset_cache"] = config.get("asset_cache", ".cache/assets")
        return part
    if stage == "prepare_data":
        part["data"] = config["data"]
        part["records"] = edit_records(config)
        if (streamed := streamed_corpus(config)) is not None:  # sampled here into corpus.jsonl
            part["corpus_sample"] = {"corpus": streamed, "n_samples": config["stats"]["n_samples"]}
        if (held_out := perplexity_texts(config)) is not None:
            part["perplexity_texts"] = held_out
        if config["data"]["source"] == "toyworld":
            del part["model"]  # the world does not depend on the model
        else:
            part["asset_cache"] = config.get("asset_cache", ".cache/assets")
        return part
    if stage == "statistics":
        stats = config["stats"]
        if (streamed := streamed_corpus(config)) is not None:  # corpus.jsonl is prepare_data's sample of it
            stats = {**{k: v for k, v in stats.items() if k != "n_samples"}, "corpus": streamed}
        return {**part, "stats": stats, "statistics_layers": statistics_layers(config)}
    if stage == "causal_trace":
        return {**part, "model": {**loaded, "name": model["name"]}, "tracing": config["tracing"],
                "records": edit_records(config)}
    if stage == "train_mend":
        block = trained_editor_block(config)
        part = {**part, "methods": {block: config["methods"][block]}, "mend_training_offset": mend_training_offset(config),
                "records": edit_records(config)}
        if config["methods"][block].get("pinned"):  # a re-pinned editor (a new manifest) reruns the job
            from editlib.toy.pinned import manifest_sha256

            part["pinned_manifest_sha256"] = manifest_sha256(config["methods"][block]["pinned"])
        return part
    # the lm-eval settings; whether the states are deleted afterwards is the workflow's business
    downstream = {k: v for k, v in config["downstream"].items() if k != "temporary_states"}
    if stage == "downstream_base":
        return {**part, "downstream": downstream}
    if stage in ("downstream_batched", "downstream_sequential"):
        # the states carry the edits; the method's block rebuilds the session that loads them
        part["model"] = {**loaded, "name": model["name"]}
        part.update({"downstream": downstream, "methods": {method: _editing_block(config, method)}})
        if stage == "downstream_sequential":  # whether the run's table gets the unedited model's rows
            part["experiments"] = {"sequential": {"downstream_at": config["experiments"]["sequential"].get("downstream_at", [])}}
        return part
    # editing experiments
    block = _editing_block(config, method)
    experiments = config["experiments"]
    part["model"] = {**loaded, "name": model["name"]}  # the name labels result rows
    part.update({"target_cache": config.get("target_cache", ".cache/targets"), "metrics": config["metrics"],
                 "methods": {method: block}, "experiments": {}, "records": edit_records(config)})
    if stage == "layer_sweep":
        part["experiments"]["layer_sweep"] = _job_settings(experiments["layer_sweep"], "criterion")
        return part
    if configured_method(config, method).chooses_layers and block.get("layers", "auto") == "auto":  # the sweep's criterion picks
        part["experiments"]["layer_sweep"] = {"criterion": experiments["layer_sweep"].get("criterion", "S")}
    if stage == "sensitivity":  # this method's grid only
        sensitivity = experiments["sensitivity"]
        part["experiments"]["sensitivity"] = {"n_records": sensitivity["n_records"],
                                              "grid": {method: sensitivity["grid"][method]},
                                              **{k: sensitivity[k] for k in ("batch_sizes",) if k in sensitivity}}
        return part
    # a sequential job's batch size and edit sample are its wildcards; the lists choose which jobs exist
    # how often the checkpoint is written changes no result: the job script reads it from the whole config
    part["experiments"][stage] = _job_settings(experiments[stage], *(("batch_sizes", "samples", "checkpoint_minutes")
                                                                     if stage == "sequential" else ()))
    return part


def _job_settings(experiment: dict, *unread: str) -> dict:
    """An experiment's settings as one of its jobs reads them: without the lists that choose which
    jobs exist (`methods`, `method_batch_sizes`), so adding a method reruns no other method's job."""
    return {k: v for k, v in experiment.items() if k not in {"methods", "method_batch_sizes", *unread}}


def model_names(config: dict) -> list[str]:
    """Every model a run edits, in order: `model` (by its name), then the variants under `models`."""
    return [config["model"]["name"], *config.get("models", {})]


def model_config(config: dict, name: str) -> dict:
    """`config` as the jobs of model `name` read it: `model` is that model's block (a variant under
    `models` names only what differs from `model`; its key is its name) and `models` is gone."""
    if name == config["model"]["name"]:
        block = config["model"]
    elif name in config.get("models", {}):

        block = {**deep_merge(config["model"], config["models"][name]), "name": name}
    else:
        raise KeyError(f"no model named {name!r} (configured: {model_names(config)})")
    return {**{k: v for k, v in config.items() if k != "models"}, "model": block}


def edit_records(config: dict) -> dict:
    """Which records the experiments edit (data.records, data.zsre_target), as the stages read it."""
    data = config["data"]
    return {"kind": data.get("records", "counterfact"), "zsre_target": data.get("zsre_target", "answers")}


def sequential_runs(config: dict) -> list[tuple[str, int, int]]:
    """(method, batch size, sample) of every sequential run: `batch_sizes` for each method, unless
    `method_batch_sizes` names the method, each on every one of `samples` disjoint edit samples."""
    sequential = config["experiments"]["sequential"]
    overrides = sequential.get("method_batch_sizes", {})
    return [(method, size, sample) for method in sequential["methods"]
            for size in overrides.get(method, sequential["batch_sizes"]) for sample in range(sequential_samples(config))]


def state_points(total_edits: int, batch_size: int, downstream_at: Sequence[int]) -> list[int]:
    """The edit counts in `downstream_at` that a sequential run of `batch_size` reaches (> 0)."""
    reached = {min(step * batch_size, total_edits) for step in range(1, -(-total_edits // batch_size) + 1)}
    return sorted(n for n in set(downstream_at) if n in reached)


def sequential_samples(config: dict) -> int:
    """How many disjoint edit samples each sequential run edits (sample s: records
    s * total_edits to (s + 1) * total_edits - 1 of the prepared, seeded order)."""
    return config["experiments"]["sequential"].get("samples", 1)


def streamed_corpus(config: dict) -> str | None:
    """The HF dataset ("hf:path:config:split") the statistics corpus is streamed from, or None
    for a local corpus: stats.corpus, or with stats.corpus "data" (the default) a counterfact
    source's data.corpus. The prepare_data job samples stats.n_samples documents of it into
    corpus.jsonl; the statistics job reads that sample."""
    spec = config["stats"].get("corpus") or "data"
    if spec == "data" and config["data"]["source"] == "counterfact":
        spec = config["data"].get("corpus") or "data"
    return spec if spec.startswith("hf:") else None


def statistics_layers(config: dict) -> list[int]:
    """Every layer a method that needs C may edit: the sweep's layers plus explicit method layers."""
    layers = set(config["experiments"]["layer_sweep"]["layers"])
    for method in config["methods"]:
        if not configured_method(config, method).uses_statistics:
            continue
        explicit = config["methods"][method].get("layers")
        if isinstance(explicit, list):
            layers.update(explicit)
    return sorted(layers)


def mend_training_offset(config: dict) -> int:
    """MEND trains on the records after this many (those the experiments may edit)."""
    experiments = config["experiments"]
    return max(experiments["sequential"]["total_edits"] * sequential_samples(config), experiments["layer_sweep"]["n_records"],
               experiments.get("sensitivity", {}).get("n_records", 0),
               experiments["single"]["n_records"], max(experiments["batched"]["batch_sizes"]))


def local_task_names(data: dict) -> set[str]:
    """The lm-eval tasks the data stage writes for `data.source` (downstream.tasks may use them)."""
    from editlib.data.bigbench import DEFAULT_BIGBENCH_MC_TASKS, bigbench_mc_filename

    if data["source"] == "toyworld":
        return {"toy_facts", "toy_compose"}
    from editlib.data.packaged import WIKI_PERPLEXITY_TASK

    if data["source"] == "qa_wikidata":
        return {f"bb_{bigbench_mc_filename(task).removesuffix('.jsonl')}" for task in DEFAULT_BIGBENCH_MC_TASKS} | {
            WIKI_PERPLEXITY_TASK}
    if data["source"] == "country_facts":
        from editlib.data.country_facts import UNEDITED_TASK

        return {UNEDITED_TASK, WIKI_PERPLEXITY_TASK}
    return set()  # counterfact: no local tasks


def perplexity_texts(config: dict) -> dict | None:
    """What the data stage reads to write the Wikipedia perplexity task, where downstream.tasks names
    it: how many leads it holds (data.perplexity_texts) and how many the statistics sample first
    from the same seeded shuffle (stats.n_samples with stats.corpus "data", the prepared leads; none
    with another corpus), which the task skips. None where the task is not asked for."""
    from editlib.data.packaged import WIKI_PERPLEXITY_TASK, WIKI_PERPLEXITY_TEXTS

    if WIKI_PERPLEXITY_TASK not in config["downstream"]["tasks"] or config["data"]["source"] not in (
            "qa_wikidata", "country_facts"):
        return None
    stats = config["stats"]
    return {"n_texts": config["data"].get("perplexity_texts", WIKI_PERPLEXITY_TEXTS),
            "statistics_documents": stats["n_samples"] if (stats.get("corpus") or "data") == "data" else 0}


def toy_record_count(config: dict) -> int | None:
    """How many edit records the toy world of `config` has (None for other data sources)."""
    if config["data"]["source"] != "toyworld":
        return None
    from editlib.toy.world import WorldConfig, edit_facts, make_world

    return len(edit_facts(make_world(WorldConfig(**config["data"].get("world", {})))))


def country_record_count(config: dict) -> int | None:
    """How many edit records data.source country_facts builds with the config's seed, before the
    known-fact filter (None for other data sources); reads the installed countryinfo package."""
    if config["data"]["source"] != "country_facts":
        return None
    from editlib.data.country_facts import country_facts_records

    return len(country_facts_records(seed=config["seed"]))


# experiments.sequential.checkpoint_minutes when unset: a sequential run's checkpoint is written at
# most this often (and after the last batch)
CHECKPOINT_MINUTES = 10.0


def sequential_scorings(total_edits: int, batch_size: int, eval_at: list[int] | None) -> int:
    """Records a sequential run of `total_edits` edits in batches of `batch_size` scores
    (editlib.study.experiments.sequential_edits): each batch's own records, plus every record edited so
    far after the batches whose count is in `eval_at` and after the last one (every batch when
    `eval_at` is None: b*k(k+1)/2 for k full batches, quadratic in the edits)."""
    counts = [min((step + 1) * batch_size, total_edits) for step in range(-(-total_edits // batch_size))]
    points = set(eval_at) if eval_at is not None else set(counts)
    evaluated = [n for step, n in enumerate(counts) if n in points or step == len(counts) - 1]
    current = sum(n - (counts[step - 1] if step else 0) for step, n in enumerate(counts) if n not in evaluated)
    return current + sum(evaluated)  # an evaluated batch is scored within its edited-so-far pass


def log_spaced_counts(total: int, extra: list[int] = ()) -> list[int]:
    """1, 2, 4, ... below `total`, then `total`, with the positive counts of `extra` (e.g. downstream_at)."""
    counts = {total, *(n for n in extra if 0 < n <= total)}
    power = 1
    while power < total:
        counts.add(power)
        power *= 2
    return sorted(counts)


def method_overrides(config: dict, method: str) -> dict[str, Any]:
    """A method's hyperparameters from config (its block minus layers and training keys)."""
    return {k: v for k, v in config["methods"][method].items() if k not in NON_HPARAM_KEYS}


def method_name(config: dict, name: str) -> str:
    """The registered method a config block runs: its `method:` key (a variant such as a second
    MEMIT with other layers), else the block's own name."""
    return config["methods"][name].get("method", name)


def _editing_block(config: dict, method: str) -> dict:
    """A method's block as the jobs that edit with it read it: without `pinned`, which only the
    train_mend job reads (the trained editor is their input file)."""
    return {k: v for k, v in config["methods"][method].items() if k != "pinned"}


def trained_editor_block(config: dict) -> str | None:
    """The method block whose method needs a trained editor (MEND), or None; a run trains one
    (config validation rejects a second)."""
    blocks = [name for name in config["methods"] if configured_method(config, name).trained_editor]
    return blocks[0] if blocks else None


def configured_method(config: dict, name: str):
    """The registry entry (editlib.methods.registry.Method) of config block `name`."""
    from editlib.methods.registry import get_method

    return get_method(method_name(config, name))
