"""Workflow config: JSON-schema validation plus the cross-field checks a schema cannot express.

Errors name the config file and the field path (e.g. ``config.yaml: experiments.sequential.methods[2]:
'memitt' is not one of [...]``) so users see at once what to fix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from editlib.study.stages import (
    configured_method,
    country_record_count,
    local_task_names,
    log_spaced_counts,
    mend_training_offset,
    method_name,
    method_overrides,
    model_config,
    model_names,
    sequential_runs,
    sequential_samples,
    sequential_scorings,
    toy_record_count,
    trained_editor_block,
)


class ConfigError(ValueError):
    """An invalid workflow config; the message names the file and field."""


def _field(path) -> str:
    parts = []
    for part in path:
        parts.append(f"[{part}]" if isinstance(part, int) else (f".{part}" if parts else str(part)))
    return "".join(parts) or "<top level>"


def load_schema(schema_path: str | Path) -> dict:
    """The config schema, its method names filled in from the registry (editlib.methods.registry)."""
    from editlib.methods.registry import method_names

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


def _check_sensitivity(config: dict, source: str) -> None:
    """Each method of the sensitivity grid is a method block whose spec takes the swept values."""
    from editlib.methods.registry import make_spec

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
    from editlib.methods.registry import METHODS

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


# SmolLM2-135M-Instruct (model.source: smollm2, editlib.data.packaged.prepare_smollm2): num_hidden_layers
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
    local folder `model.path`, else the local Hugging Face cache, else editlib.model.architectures
    (revision main only), else downloaded from the hub (config.json only). A gated model the user
    may not read, an unknown repository or revision raise ConfigError saying how to fix it; when the
    hub cannot be reached the check is skipped with a warning (returns None): the job loading the
    model fails with the loader's own error then.
    """
    if model["source"] == "toyworld":
        from editlib.toy.recipe import TrainConfig

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
    from editlib.model.architectures import HUB_ARCHITECTURES

    if path in HUB_ARCHITECTURES and revision in (None, "main"):
        return HUB_ARCHITECTURES[path], "editlib.model.architectures.HUB_ARCHITECTURES"
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

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
    from editlib.study.ablations import KINDS

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


def _check_pinned(config: dict, source: str) -> None:
    """model.pinned names a toy model folder whose manifest parses and lists files that exist (their
    bytes are hashed by the prepare_model job, which also decides whether the recipe matches)."""
    from editlib.toy.pinned import PinnedModelError, read_manifest
    from editlib.toy.recipe import TrainConfig

    model = config["model"]
    if model.get("pinned") is None:
        return
    if model["source"] != "toyworld":
        raise ConfigError(f"{source}: model.pinned: a pinned model is a trained toy model; it needs model.source "
                          f"toyworld, not {model['source']!r}")
    try:
        manifest = read_manifest(model["pinned"])
    except PinnedModelError as error:
        raise ConfigError(f"{source}: model.pinned: {error}") from None
    _construct(f"{source}: model.pinned: {model['pinned']}/pinned.json: recipe", TrainConfig, manifest["recipe"])


def _check_pinned_editor(config: dict, source: str) -> None:
    """`pinned` only on the trained editor's block, naming a folder whose manifest parses and lists the
    editor's files (the train_mend job hashes them and decides whether recipe and inputs match)."""
    from editlib.toy.pinned import EDITOR_FILES, EDITOR_REQUIRED, PinnedModelError, read_manifest

    for name, block in config["methods"].items():
        if block.get("pinned") is None:
            continue
        setting = f"methods.{name}.pinned"
        if not configured_method(config, name).trained_editor:
            raise ConfigError(f"{source}: {setting}: only a method with a trained editor (mend) can be pinned; "
                              f"{method_name(config, name)} trains nothing")
        if not isinstance(block["pinned"], str):
            raise ConfigError(f"{source}: {setting}: a folder path (e.g. models/toy-5L-mend) or null")
        try:
            read_manifest(block["pinned"], EDITOR_REQUIRED, EDITOR_FILES, setting, "editor")
        except PinnedModelError as error:
            raise ConfigError(f"{source}: {setting}: {error}") from None


def _check_values(config: dict, source: str) -> None:
    """Ranges the schema cannot state: hyperparameters, the toy model and world, record counts,
    downstream tasks."""
    from editlib.methods.mend import MendHparams
    from editlib.methods.registry import make_spec
    from editlib.toy.recipe import TrainConfig
    from editlib.toy.world import WorldConfig

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
    _check_pinned(config, source)
    _check_pinned_editor(config, source)
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
    available, origin = toy_record_count(config), "the toy world (data.world) has {n}"
    if available is None and (available := _country_record_count(config, source)) is not None:
        filtered = config["data"].get("known_filter", True)
        origin = "data.source country_facts builds {n}" + (" (before data.known_filter)" if filtered else "")
    if available is not None:
        needs = {"experiments.layer_sweep.n_records": experiments["layer_sweep"]["n_records"],
                 "experiments.single.n_records": experiments["single"]["n_records"],
                 "experiments.batched.n_records": batched.get("n_records", max(batched["batch_sizes"])),
                 "experiments.sequential.total_edits": experiments["sequential"]["total_edits"] * sequential_samples(config),
                 "experiments.sensitivity.n_records": experiments.get("sensitivity", {}).get("n_records", 0)}
        for field, n in needs.items():
            if n > available:
                times = " (x samples)" if field.endswith("total_edits") and sequential_samples(config) > 1 else ""
                raise ConfigError(f"{source}: {field}{times}: {n} records needed, {origin.format(n=available)}")
        if (block := trained_editor_block(config)) is not None:
            mend = config["methods"][block]
            used = mend_training_offset(config)
            wanted = mend.get("n_train", 100) + mend.get("n_eval", 20)
            if used + wanted > available:
                raise ConfigError(f"{source}: methods.{block}: n_train + n_eval = {wanted} records beyond the first "
                                  f"{used} (edited by the experiments), but {origin.format(n=available)}")
    downstream = config["downstream"]
    if not downstream.get("include_defaults", False):
        local = local_task_names(config["data"])
        for index, task in enumerate(downstream["tasks"]):
            if task not in local:
                raise ConfigError(f"{source}: downstream.tasks[{index}]: {task!r} is not a task of data.source "
                                  f"{config['data']['source']!r} (those are {sorted(local) or 'none'}); set "
                                  f"downstream.include_defaults: true for lm-evaluation-harness's own tasks")


def _country_record_count(config: dict, source: str) -> int | None:
    """`country_record_count`, or ConfigError when the countryinfo package cannot be read."""
    from editlib.data.fetch import AssetError

    try:
        return country_record_count(config)
    except AssetError as error:
        raise ConfigError(f"{source}: data.source: {error}") from None


# A sequential run with more batches than this needs experiments.sequential.eval_at.
MAX_BATCHES_WITHOUT_EVAL_AT = 64


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
