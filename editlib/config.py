"""Workflow config: JSON-schema validation plus the cross-field checks a schema cannot express.

Errors name the config file and the field path (e.g. ``config.yaml: experiments.sequential.methods[2]:
'memitt' is not one of [...]``) so users see at once what to fix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import yaml

# Keys of a method's config block that are not hyperparameters of the method itself.
NON_HPARAM_KEYS = {"method", "layers", "n_train", "n_eval", "hparams"}


class ConfigError(ValueError):
    """An invalid workflow config; the message names the file and field."""


def _field(path) -> str:
    parts = []
    for part in path:
        parts.append(f"[{part}]" if isinstance(part, int) else (f".{part}" if parts else str(part)))
    return "".join(parts) or "<top level>"


def load_schema(schema_path: str | Path) -> dict:
    """The config schema, its method names filled in from the registry (editlib.methods)."""
    from .methods import method_names

    schema = yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))
    schema["$defs"]["method_name"] = {"enum": method_names()}
    return schema


def validate_config(config: dict, schema_path: str | Path, source: str = "config") -> dict:
    """Check `config` against the schema and cross-field rules; raises ConfigError on the first problem."""
    import jsonschema

    schema = load_schema(schema_path)
    validator_class = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_class(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        raise ConfigError(f"{source}: {_field(error.absolute_path)}: {error.message}")
    names = model_names(config)
    if len(set(names)) < len(names):
        raise ConfigError(f"{source}: models: a variant takes model.name {names[0]!r}; give it another name")
    for name in names:  # each model's jobs read the config with its own block as `model`
        where = source if name == names[0] else f"{source}: models.{name} merged over model"
        _check_cross_fields(model_config(config, name), where)
        _check_values(model_config(config, name), where)
    _check_ablations(config, source)
    _check_sensitivity(config, source)
    _check_figures(config, source)
    return config


def _check_figures(config: dict, source: str) -> None:
    """Each figures.y_limits range is [lo, hi] with lo < hi (the schema checks names and shape)."""
    for metric, (lo, hi) in config.get("figures", {}).get("y_limits", {}).items():
        if not lo < hi:
            raise ConfigError(f"{source}: figures.y_limits.{metric}: [{lo}, {hi}] must be [lo, hi] with lo < hi")


def sensitivity_methods(config: dict) -> list[str]:
    """The method blocks of the sensitivity stage (the keys of experiments.sensitivity.grid)."""
    return list(config["experiments"].get("sensitivity", {}).get("grid", {}))


def _check_sensitivity(config: dict, source: str) -> None:
    """Each method of the sensitivity grid is a method block whose spec takes the swept values."""
    from .methods import make_spec

    settings = config["experiments"].get("sensitivity", {})
    for index, batch_size in enumerate(settings.get("batch_sizes", [])):
        if batch_size > settings["n_records"]:
            raise ConfigError(f"{source}: experiments.sensitivity.batch_sizes[{index}]: batch size {batch_size} exceeds "
                              f"n_records {settings['n_records']}")
    for method, grid in settings.get("grid", {}).items():
        field = f"{source}: experiments.sensitivity.grid.{method}"
        if method not in config["methods"]:
            raise ConfigError(f"{field}: method {method!r} has no entry under 'methods' (configured: "
                              f"{sorted(config['methods'])})")
        if not configured_method(config, method).uses_statistics:
            raise ConfigError(f"{field}: the sensitivity stage sweeps locate-and-edit methods' hyperparameters")
        if config["methods"][method].get("layers", "auto") == "auto" and \
                method not in config["experiments"]["layer_sweep"]["methods"]:
            raise ConfigError(f"{field}: layers 'auto' takes the best layer of {method}'s sweep, but {method} is "
                              f"not in experiments.layer_sweep.methods")
        [(parameter, values)] = grid.items()
        for index, value in enumerate(values):
            _check_sign(f"{field}.{parameter}[{index}]", parameter, value)
            try:
                make_spec(method_name(config, method), {**method_overrides(config, method), parameter: value}, (0,))
            except (TypeError, ValueError) as error:
                raise ConfigError(f"{field}.{parameter}[{index}]: {_plain(error)}") from None


def _check_cross_fields(config: dict, source: str) -> None:
    from .methods import METHODS

    methods = config["methods"]
    for name, block in methods.items():
        if "method" not in block and name not in METHODS:
            raise ConfigError(f"{source}: methods.{name}: not a registered method (those are {sorted(METHODS)}); "
                              f"a variant of one names it with 'method:'")
        if name in METHODS and block.get("method", name) != name:
            raise ConfigError(f"{source}: methods.{name}.method: a block named after a registered method runs it; "
                              f"give the variant another name")
        if configured_method(config, name).trained_editor and name != method_name(config, name):
            raise ConfigError(f"{source}: methods.{name}: {method_name(config, name)} is trained once, by its own "
                              f"block; it has no variants")
    experiments = config["experiments"]
    for name, experiment in experiments.items():
        for index, method in enumerate(experiment.get("methods", [])):
            if method not in methods:
                raise ConfigError(f"{source}: experiments.{name}.methods[{index}]: method {method!r} has no entry "
                                  f"under 'methods' (configured: {sorted(methods)})")
    sweep = experiments["layer_sweep"]
    for index, method in enumerate(sweep["methods"]):
        if not configured_method(config, method).chooses_layers:
            raise ConfigError(f"{source}: experiments.layer_sweep.methods[{index}]: {method} edits the layers of "
                              f"its own design; there is no layer to sweep")
    for method, block in methods.items():
        if block.get("layers", "auto") == "auto" and configured_method(config, method).chooses_layers \
                and method not in sweep["methods"]:
            used = [name for name, e in experiments.items() if method in e.get("methods", [])]
            if used:
                raise ConfigError(f"{source}: methods.{method}.layers: 'auto' takes the best layer of {method}'s own "
                                  f"layer sweep, but {method} is not in experiments.layer_sweep.methods")
    _check_layers(config, source)
    sequential = experiments["sequential"]
    for index, n in enumerate(sequential.get("downstream_at", [])):
        if n > sequential["total_edits"]:
            raise ConfigError(f"{source}: experiments.sequential.downstream_at[{index}]: {n} exceeds total_edits "
                              f"{sequential['total_edits']}")
    for index, size in enumerate(sequential["batch_sizes"]):
        if size > sequential["total_edits"]:
            raise ConfigError(f"{source}: experiments.sequential.batch_sizes[{index}]: {size} exceeds total_edits "
                              f"{sequential['total_edits']}")
    for method, sizes in sequential.get("method_batch_sizes", {}).items():
        if method not in sequential["methods"]:
            raise ConfigError(f"{source}: experiments.sequential.method_batch_sizes.{method}: {method!r} is not in "
                              f"experiments.sequential.methods")
        for index, size in enumerate(sizes):
            if size > sequential["total_edits"]:
                raise ConfigError(f"{source}: experiments.sequential.method_batch_sizes.{method}[{index}]: {size} "
                                  f"exceeds total_edits {sequential['total_edits']}")


def _check_layers(config: dict, source: str) -> None:
    """Every layer a config names is a layer of its model: the sweep's layers and the MLP-writing
    methods' layers have an MLP there, other methods' (GRACE wraps the module) are < the depth."""
    depth = model_depth(config["model"], source)
    if depth is None:
        return
    methods, sweep = config["methods"], config["experiments"]["layer_sweep"]
    for index, layer in enumerate(sweep["layers"]):
        if layer >= depth.editable:
            raise ConfigError(f"{source}: experiments.layer_sweep.layers[{index}]: layer {layer} out of range for "
                              f"{depth.editable_what} ({depth.editable_field}); allowed: 0..{depth.editable - 1}")
    for method, block in methods.items():
        # a method that does not write MLP weights (GRACE wraps the module) may use any layer
        writes_mlp = configured_method(config, method).writes_mlp
        limit = depth.editable if writes_mlp else depth.layers
        what, where = (depth.editable_what, depth.editable_field) if writes_mlp else (depth.what, depth.field)
        for index, layer in enumerate(block.get("layers") if isinstance(block.get("layers"), list) else []):
            if layer >= limit:
                raise ConfigError(f"{source}: methods.{method}.layers[{index}]: layer {layer} out of range for "
                                  f"{what} ({where}); allowed: 0..{limit - 1}")


# SmolLM2-135M-Instruct (model.source: smollm2, editlib.assets.prepare_smollm2): num_hidden_layers
SMOLLM2_LAYERS = 30


@dataclasses.dataclass(frozen=True)
class ModelDepth:
    """A model's number of layers, the first `editable` of which have an MLP, and where the numbers
    come from (for error messages)."""

    layers: int
    what: str
    field: str
    editable: int | None = None
    editable_what: str | None = None
    editable_field: str | None = None

    def __post_init__(self):
        if self.editable is None:
            object.__setattr__(self, "editable", self.layers)
            object.__setattr__(self, "editable_what", self.what)
            object.__setattr__(self, "editable_field", self.field)


def model_depth(model: dict, source: str = "config") -> ModelDepth | None:
    """The depth of model block `model`, read before any job runs.

    toyworld: model.train.layers (and mlp_layers: the layers with an MLP); smollm2: 30; hub: the
    `num_hidden_layers` (or `n_layer`) of the model's config.json at `model.revision`, read from a
    local folder `model.path`, else the local Hugging Face cache, else editlib.architectures
    (revision main only), else downloaded from the hub (config.json only). A gated model the user
    may not read, an unknown repository or revision raise ConfigError saying how to fix it; when the
    hub cannot be reached the check is skipped with a warning (returns None): the job loading the
    model fails with the loader's own error then.
    """
    if model["source"] == "toyworld":
        from .hparams import TrainConfig

        train = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, **model.get("train", {})}
        n_layers = train["layers"]
        if not isinstance(n_layers, int) or n_layers < 1:
            return None  # TrainConfig's own check names the field
        whole = ModelDepth(n_layers, f"a {n_layers}-layer model", "model.train.layers")
        editable = train.get("mlp_layers") or n_layers
        if editable >= n_layers:
            return whole
        # layers >= mlp_layers of the toy model have no MLP: nothing there for an editor to change
        return dataclasses.replace(whole, editable=editable, editable_field="model.train.mlp_layers",
                                   editable_what=f"the toy model, whose MLPs are in layers 0..{editable - 1} only")
    if model["source"] == "smollm2":
        return ModelDepth(SMOLLM2_LAYERS, f"SmolLM2-135M-Instruct ({SMOLLM2_LAYERS} layers)", "model.source smollm2")
    path, revision = model["path"], model.get("revision")
    found = hub_config(path, revision, source)
    if found is None:
        return None
    fields, origin = found
    n_layers = fields.get("num_hidden_layers", fields.get("n_layer"))
    if not isinstance(n_layers, int):
        import warnings

        warnings.warn(f"{source}: model.path: {origin} has no num_hidden_layers or n_layer; layers not checked")
        return None
    at = f"@{revision}" if revision else ""
    return ModelDepth(n_layers, f"{path}{at}, a {n_layers}-layer model per {origin}", "model.path")


def hub_config(path: str, revision: str | None, source: str = "config") -> tuple[dict, str] | None:
    """(fields of config.json, where they were read) of hub model `path` at `revision`; None (with a
    warning) when the hub cannot be reached. See `model_depth` for the order of the sources."""
    import json
    import warnings

    local = Path(path).expanduser()
    if local.is_dir():
        try:
            return json.loads((local / "config.json").read_text(encoding="utf-8")), f"{local / 'config.json'}"
        except (OSError, ValueError) as error:
            raise ConfigError(f"{source}: model.path: {path!r} is a folder without a readable config.json "
                              f"({error}); give a hub id or a saved model folder") from None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(path, "config.json", revision=revision)
    except ValueError:  # not a valid repository id
        raise ConfigError(f"{source}: model.path: {path!r} is neither a local folder nor a hub id "
                          f"(owner/name)") from None
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text(encoding="utf-8")), "the Hugging Face cache's config.json"
    from .architectures import HUB_ARCHITECTURES

    if path in HUB_ARCHITECTURES and revision in (None, "main"):
        return HUB_ARCHITECTURES[path], "editlib.architectures.HUB_ARCHITECTURES"
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    try:
        downloaded = hf_hub_download(path, "config.json", revision=revision)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:  # before EntryNotFoundError, its base
        warnings.warn(f"{source}: model.path: the hub cannot be reached for {path!r}'s config.json ({error}); "
                      f"its layers are not checked against its depth (HF_HUB_OFFLINE=1 skips the attempt)")
        return None
    except GatedRepoError:
        raise ConfigError(f"{source}: model.path: {path!r} is a gated model: accept its licence on "
                          f"https://huggingface.co/{path} and log in (`huggingface-cli login`, or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{source}: model.revision: {revision!r} is not a commit, branch or tag of {path!r}") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{source}: model.path: no hub model {path!r} (or a private one: log in with "
                          f"`huggingface-cli login` or set HF_TOKEN)") from None
    except EntryNotFoundError:
        raise ConfigError(f"{source}: model.path: hub repository {path!r} has no config.json; not a "
                          f"transformers model") from None
    except (HfHubHTTPError, OSError) as error:
        warnings.warn(f"{source}: model.path: the hub cannot be reached for {path!r}'s config.json ({error}); "
                      f"its layers are not checked against its depth")
        return None
    return json.loads(Path(downloaded).read_text(encoding="utf-8")), "the hub's config.json"


def _check_ablations(config: dict, source: str) -> None:
    """Every arm an ablation names is a sequential method block or a configured model."""
    from .ablations import KINDS

    sequential = config["experiments"]["sequential"]
    for kind, entries in config.get("ablations", {}).items():
        for index, entry in enumerate(entries):
            if kind == "batch_size":
                sizes = sequential.get("method_batch_sizes", {}).get(entry, sequential["batch_sizes"])
                if entry not in sequential["methods"] or len(sizes) < 2:
                    raise ConfigError(f"{source}: ablations.batch_size[{index}]: {entry!r} must be in "
                                      f"experiments.sequential.methods with at least two batch sizes")
                continue
            for role in KINDS[kind].roles:
                name = entry[role]
                if KINDS[kind].arms == "models" and name not in model_names(config):
                    raise ConfigError(f"{source}: ablations.{kind}[{index}].{role}: {name!r} is not a configured "
                                      f"model (model.name or a key of models: {model_names(config)})")
                if KINDS[kind].arms == "methods" and name not in sequential["methods"]:
                    raise ConfigError(f"{source}: ablations.{kind}[{index}].{role}: {name!r} is not in "
                                      f"experiments.sequential.methods (an ablation compares sequential runs)")


# ---------------------------------------------------------------------------- what each stage reads

STAGES = ("prepare_data", "prepare_model", "statistics", "causal_trace", "train_mend", "layer_sweep",
          "sensitivity", "single", "batched", "sequential", "downstream_base", "downstream_batched", "downstream_sequential", "report",
          "figures")


def stage_config(config: dict, stage: str, method: str | None = None) -> dict:
    """Exactly the part of `config` that `stage` reads (for `method`, where it has one).

    Each rule passes this as its `params.stage` and its script hands it to the stage function in
    editlib.pipeline instead of the whole config; Snakemake reruns a job when its params change,
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
        if model["source"] == "smollm2":
            part["asset_cache"] = config.get("asset_cache", ".cache/assets")
        return part
    if stage == "prepare_data":
        part["data"] = config["data"]
        part["records"] = edit_records(config)
        if (streamed := streamed_corpus(config)) is not None:  # sampled here into corpus.jsonl
            part["corpus_sample"] = {"corpus": streamed, "n_samples": config["stats"]["n_samples"]}
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
        return {**part, "methods": {"mend": config["methods"]["mend"]}, "mend_training_offset": mend_training_offset(config),
                "records": edit_records(config)}
    # the lm-eval settings; whether the states are deleted afterwards is the workflow's business
    downstream = {k: v for k, v in config["downstream"].items() if k != "temporary_states"}
    if stage == "downstream_base":
        return {**part, "downstream": downstream}
    if stage in ("downstream_batched", "downstream_sequential"):
        # the states carry the edits; the method's block rebuilds the session that loads them
        part["model"] = {**loaded, "name": model["name"]}
        part.update({"downstream": downstream, "methods": {method: config["methods"][method]}})
        if stage == "downstream_sequential":  # whether the run's table gets the unedited model's rows
            part["experiments"] = {"sequential": {"downstream_at": config["experiments"]["sequential"].get("downstream_at", [])}}
        return part
    # editing experiments
    block = config["methods"][method]
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
        from .hparams import deep_merge

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


# Hyperparameters that must be > 0 wherever they appear in a method's block (all others >= 0).
POSITIVE_HPARAMS = {"v_num_grad_steps", "v_lr", "clamp_norm_factor", "mom2_update_weight", "nullspace_threshold",
                    "eps", "edit_lr", "lr", "lr_lr", "rank", "batch_size", "n_edit_layers", "n_train", "n_eval",
                    "facts_per_chunk", "n_iter", "steps", "log_every", "n_locality", "grad_clip"}


def _check_sign(field: str, key: str, value) -> None:
    """Hyperparameter `key` is > 0 (POSITIVE_HPARAMS) or >= 0; `field` names it in the error."""
    if value < 0 or (key in POSITIVE_HPARAMS and value <= 0):
        raise ConfigError(f"{field}: {value} must be {'> 0' if key in POSITIVE_HPARAMS else '>= 0'}")


def _numbers(block: dict, path: str):
    for key, value in block.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{path}.{key}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{path}.{key}", key, value


def _plain(error: Exception) -> str:
    """A TypeError from a dataclass constructor, in the config's words."""
    text = str(error)
    if isinstance(error, TypeError) and "unexpected keyword argument" in text:
        return "unknown hyperparameter " + text.split("unexpected keyword argument", 1)[1].strip()
    return text


def _construct(what: str, cls, values: dict) -> None:
    """Build dataclass `cls` from `values` so that its own checks run now, not in a job."""
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {sorted(unknown)}; allowed: "
                          f"{sorted(f.name for f in dataclasses.fields(cls))}")
    try:
        cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{what}: {error}") from None


def mend_training_offset(config: dict) -> int:
    """MEND trains on the records after this many (those the experiments may edit)."""
    experiments = config["experiments"]
    return max(experiments["sequential"]["total_edits"] * sequential_samples(config), experiments["layer_sweep"]["n_records"],
               experiments.get("sensitivity", {}).get("n_records", 0),
               experiments["single"]["n_records"], max(experiments["batched"]["batch_sizes"]))


def local_task_names(data: dict) -> set[str]:
    """The lm-eval tasks the data stage writes for `data.source` (downstream.tasks may use them)."""
    from .assets import DEFAULT_BIGBENCH_MC_TASKS, bigbench_mc_filename

    if data["source"] == "toyworld":
        return {"toy_facts", "toy_compose"}
    if data["source"] == "qa_wikidata":
        return {f"bb_{bigbench_mc_filename(task).removesuffix('.jsonl')}" for task in DEFAULT_BIGBENCH_MC_TASKS}
    return set()


def toy_record_count(config: dict) -> int | None:
    """How many edit records the toy world of `config` has (None for other data sources)."""
    if config["data"]["source"] != "toyworld":
        return None
    from .toyworld import WorldConfig, edit_facts, make_world

    return len(edit_facts(make_world(WorldConfig(**config["data"].get("world", {})))))


def _check_values(config: dict, source: str) -> None:
    """Ranges the schema cannot state: hyperparameters, the toy model and world, record counts,
    downstream tasks."""
    from .methods import make_spec
    from .hparams import MendHparams, TrainConfig
    from .toyworld import WorldConfig

    for method, block in config["methods"].items():
        for path, key, value in _numbers({k: v for k, v in block.items() if k != "layers"}, f"methods.{method}"):
            _check_sign(f"{source}: {path}", key, value)
        if configured_method(config, method).trained_editor:  # the train_mend rule's settings
            _construct(f"{source}: methods.{method}.hparams", MendHparams, block.get("hparams", {}))
        try:  # the method's own checks, on a layer every model has
            make_spec(method_name(config, method), method_overrides(config, method), (0,), "<trained editor>")
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{source}: methods.{method}: {_plain(error)}") from None
    if config["model"]["source"] == "toyworld":
        _construct(f"{source}: model.train", TrainConfig, config["model"].get("train", {}))
    if config["data"]["source"] == "toyworld":
        _construct(f"{source}: data.world", WorldConfig, config["data"].get("world", {}))

    experiments = config["experiments"]
    batched = experiments["batched"]
    if "n_records" in batched:
        for index, size in enumerate(batched["batch_sizes"]):
            if size > batched["n_records"]:
                raise ConfigError(f"{source}: experiments.batched.batch_sizes[{index}]: {size} exceeds "
                                  f"experiments.batched.n_records {batched['n_records']}")
    _check_evaluation_cost(config, source)
    for index, n in enumerate(experiments["sequential"].get("eval_at", [])):
        if n > experiments["sequential"]["total_edits"]:
            raise ConfigError(f"{source}: experiments.sequential.eval_at[{index}]: {n} exceeds total_edits "
                              f"{experiments['sequential']['total_edits']}")
    available = toy_record_count(config)
    if available is not None:
        needs = {"experiments.layer_sweep.n_records": experiments["layer_sweep"]["n_records"],
                 "experiments.single.n_records": experiments["single"]["n_records"],
                 "experiments.batched.n_records": batched.get("n_records", max(batched["batch_sizes"])),
                 "experiments.sequential.total_edits": experiments["sequential"]["total_edits"] * sequential_samples(config),
                 "experiments.sensitivity.n_records": experiments.get("sensitivity", {}).get("n_records", 0)}
        for field, n in needs.items():
            if n > available:
                times = " (x samples)" if field.endswith("total_edits") and sequential_samples(config) > 1 else ""
                raise ConfigError(f"{source}: {field}{times}: {n} records needed, the toy world (data.world) has "
                                  f"{available}")
        if "mend" in config["methods"]:
            mend = config["methods"]["mend"]
            used = mend_training_offset(config)
            wanted = mend.get("n_train", 100) + mend.get("n_eval", 20)
            if used + wanted > available:
                raise ConfigError(f"{source}: methods.mend: n_train + n_eval = {wanted} records beyond the first "
                                  f"{used} (edited by the experiments) exceed the toy world's {available}")
    downstream = config["downstream"]
    if not downstream.get("include_defaults", False):
        local = local_task_names(config["data"])
        for index, task in enumerate(downstream["tasks"]):
            if task not in local:
                raise ConfigError(f"{source}: downstream.tasks[{index}]: {task!r} is not a task of data.source "
                                  f"{config['data']['source']!r} (those are {sorted(local) or 'none'}); set "
                                  f"downstream.include_defaults: true for lm-evaluation-harness's own tasks")


# experiments.sequential.checkpoint_minutes when unset: a sequential run's checkpoint is written at
# most this often (and after the last batch)
CHECKPOINT_MINUTES = 10.0

# A sequential run with more batches than this needs experiments.sequential.eval_at.
MAX_BATCHES_WITHOUT_EVAL_AT = 64


def sequential_scorings(total_edits: int, batch_size: int, eval_at: list[int] | None) -> int:
    """Records a sequential run of `total_edits` edits in batches of `batch_size` scores
    (editlib.experiments.sequential_edits): each batch's own records, plus every record edited so
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


def _check_evaluation_cost(config: dict, source: str) -> None:
    """Long sequential runs name their evaluation points: without experiments.sequential.eval_at
    the scoring of every fact edited so far after every batch is quadratic in the edits."""
    sequential = config["experiments"]["sequential"]
    if "eval_at" in sequential:
        return
    total = sequential["total_edits"]
    runs = sorted({(size, method) for method, size, _ in sequential_runs(config)})
    if not runs:
        return
    size, method = runs[0]
    n_batches = -(-total // size)
    if n_batches <= MAX_BATCHES_WITHOUT_EVAL_AT:
        return
    suggestion = log_spaced_counts(total, sequential.get("downstream_at", []))
    raise ConfigError(
        f"{source}: experiments.sequential.eval_at: required when a run has more than "
        f"{MAX_BATCHES_WITHOUT_EVAL_AT} batches: {method} at batch size {size} has {n_batches}, and scoring "
        f"every fact edited so far after each batch takes {sequential_scorings(total, size, None):,} record "
        f"scorings ({sequential_scorings(total, size, suggestion):,} with log-spaced counts); set e.g. "
        f"eval_at: {suggestion}")


def method_overrides(config: dict, method: str) -> dict[str, Any]:
    """A method's hyperparameters from config (its block minus layers and training keys)."""
    return {k: v for k, v in config["methods"][method].items() if k not in NON_HPARAM_KEYS}


def method_name(config: dict, name: str) -> str:
    """The registered method a config block runs: its `method:` key (a variant such as a second
    MEMIT with other layers), else the block's own name."""
    return config["methods"][name].get("method", name)


def configured_method(config: dict, name: str):
    """The registry entry (editlib.methods.Method) of config block `name`."""
    from .methods import get_method

    return get_method(method_name(config, name))
