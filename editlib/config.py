"""Workflow config: JSON-schema validation plus the cross-field checks a schema cannot express.

Errors name the config file and the field path (e.g. ``config.yaml: experiments.sequential.methods[2]:
'memitt' is not one of [...]``) so users see at once what to fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# Keys of a method's config block that are not hyperparameters of the method itself.
NON_HPARAM_KEYS = {"layers", "n_train", "n_eval", "hparams"}


class ConfigError(ValueError):
    """An invalid workflow config; the message names the file and field."""


def _field(path) -> str:
    parts = []
    for part in path:
        parts.append(f"[{part}]" if isinstance(part, int) else (f".{part}" if parts else str(part)))
    return "".join(parts) or "<top level>"


def validate_config(config: dict, schema_path: str | Path, source: str = "config") -> dict:
    """Check `config` against the schema and cross-field rules; raises ConfigError on the first problem."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_class(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        raise ConfigError(f"{source}: {_field(error.absolute_path)}: {error.message}")
    _check_cross_fields(config, source)
    return config


def _check_cross_fields(config: dict, source: str) -> None:
    methods = config["methods"]
    experiments = config["experiments"]
    for name, experiment in experiments.items():
        for index, method in enumerate(experiment.get("methods", [])):
            if method not in methods:
                raise ConfigError(f"{source}: experiments.{name}.methods[{index}]: method {method!r} has no entry "
                                  f"under 'methods' (configured: {sorted(methods)})")
    sweep = experiments["layer_sweep"]
    for method, block in methods.items():
        if block.get("layers", "auto") == "auto" and method != "mend" and method not in sweep["methods"]:
            used = [name for name, e in experiments.items() if method in e.get("methods", [])]
            if used:
                raise ConfigError(f"{source}: methods.{method}.layers: 'auto' takes the best layer of {method}'s own "
                                  f"layer sweep, but {method} is not in experiments.layer_sweep.methods")
    train = config["model"].get("train", {}) if config["model"]["source"] == "toyworld" else {}
    n_layers = train.get("layers")
    if n_layers is not None:
        # layers >= mlp_layers of the toy model have no MLP: nothing there for an editor to change
        editable = train.get("mlp_layers") or n_layers
        field = "model.train.mlp_layers" if editable < n_layers else "model.train.layers"
        what = f"the toy model has MLPs in layers 0..{editable - 1} only" if editable < n_layers else \
            f"a {n_layers}-layer model"
        for index, layer in enumerate(sweep["layers"]):
            if layer >= editable:
                raise ConfigError(f"{source}: experiments.layer_sweep.layers[{index}]: layer {layer} out of range "
                                  f"for {what} ({field})")
        for method, block in methods.items():
            # GRACE wraps a module whatever its weights; the others write into the MLP
            limit, limit_what, limit_field = (n_layers, f"a {n_layers}-layer model", "model.train.layers") \
                if method == "grace" else (editable, what, field)
            for index, layer in enumerate(block.get("layers") if isinstance(block.get("layers"), list) else []):
                if layer >= limit:
                    raise ConfigError(f"{source}: methods.{method}.layers[{index}]: layer {layer} out of range "
                                      f"for {limit_what} ({limit_field})")
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


def sequential_runs(config: dict) -> list[tuple[str, int]]:
    """(method, batch size) of every sequential run: `batch_sizes` for each method, unless
    `method_batch_sizes` names the method."""
    sequential = config["experiments"]["sequential"]
    overrides = sequential.get("method_batch_sizes", {})
    return [(method, size) for method in sequential["methods"]
            for size in overrides.get(method, sequential["batch_sizes"])]


def statistics_layers(config: dict) -> list[int]:
    """Every layer a method that needs C may edit: the sweep's layers plus explicit method layers."""
    layers = set(config["experiments"]["layer_sweep"]["layers"])
    for method in config["methods"]:
        if method in ("grace", "mend"):  # they use no statistics
            continue
        explicit = config["methods"][method].get("layers")
        if isinstance(explicit, list):
            layers.update(explicit)
    return sorted(layers)


def method_overrides(config: dict, method: str) -> dict[str, Any]:
    """A method's hyperparameters from config (its block minus layers and training keys)."""
    return {k: v for k, v in config["methods"][method].items() if k not in NON_HPARAM_KEYS}
