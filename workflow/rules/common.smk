# Paths and helpers shared by the rules. Everything of one run lives under results/<run>,
# resources/<run>, reports/<run>, logs/<run> and benchmarks/<run>; each model's jobs under a
# <model> folder there (the {model} wildcard), the tables of all models together at the top.

import re

from editlib.study.stages import (
    configured_method,
    model_config,
    model_names,
    sensitivity_methods,
    sequential_runs,
    stage_config,
    trained_editor_block,
)

RUN = config["run"]
MODELS = model_names(config)
# one model's files (the {model} wildcard)
RES = f"resources/{RUN}/{{model}}"
OUT = f"results/{RUN}/{{model}}"
LOGS = f"logs/{RUN}/{{model}}"
BENCH = f"benchmarks/{RUN}/{{model}}"
# the run's tables of all models, figures and report
RUN_OUT = f"results/{RUN}"
RUN_LOGS = f"logs/{RUN}"
RUN_BENCH = f"benchmarks/{RUN}"
REPORT = f"reports/{RUN}"
SCRIPTS = Path(workflow.current_basedir).parent / "scripts"
# For `--sdm conda`, the environment of all jobs; editlib itself comes from the checkout (scripts/_checkout.py)
CONDA_ENV = str(Path(workflow.basedir) / "envs" / "editlib.yaml")
EXPERIMENTS = config["experiments"]
TOY_WORLD = config["data"]["source"] == "toyworld"

DATA = {
    "records": f"{RES}/data/records.json",
    "corpus": f"{RES}/data/corpus.jsonl",
    "tasks": f"{RES}/data/tasks",
    "summary": f"{RES}/data/summary.json",
}
MODEL = f"{RES}/model"
MOMENTS = f"{RES}/stats/second_moments.safetensors"
MEND_EDITOR = f"{RES}/mend/editor.safetensors"
STATES = f"{OUT}/states"  # the edits saved by editing jobs for the downstream jobs
# the {method} and {model} wildcards: exactly the config's method blocks and models
METHOD_WILDCARD = "|".join(re.escape(name) for name in config["methods"])
MODEL_WILDCARD = "|".join(re.escape(name) for name in MODELS)


wildcard_constraints:
    model=MODEL_WILDCARD,
    method=METHOD_WILDCARD,
    batch_size=r"\d+",
    sample=r"\d+",


def stage(name):
    """params.stage of a rule: what a job of `name` reads (for its model and method wildcards)."""
    return lambda wildcards: stage_config(model_config(config, wildcards.model), name, getattr(wildcards, "method", None))


def sweep_input(wildcards):
    """The method's own layer-sweep table when its layers are 'auto', else nothing."""
    method = configured_method(config, wildcards.method)
    if not method.chooses_layers or config["methods"][wildcards.method].get("layers", "auto") != "auto":
        return []
    return f"{OUT}/layer_sweep/{wildcards.method}.csv".format(model=wildcards.model)


def mend_input(wildcards):
    """The trained hypernetwork, for a method that needs one (MEND)."""
    return MEND_EDITOR.format(model=wildcards.model) if configured_method(config, wildcards.method).trained_editor else []


def moments_input(wildcards):
    """The statistics C, for a method that uses them (the locate-and-edit family)."""
    return MOMENTS.format(model=wildcards.model) if configured_method(config, wildcards.method).uses_statistics else []


def per_model(*patterns):
    """`patterns` (with a {model} wildcard) for every model."""
    return [pattern.format(model=model) for model in MODELS for pattern in patterns]


def edit_tables():
    tables = [f"{OUT}/single/{m}.csv" for m in EXPERIMENTS["single"]["methods"]]
    tables += [f"{OUT}/batched/{m}.csv" for m in EXPERIMENTS["batched"]["methods"]]
    tables += [f"{OUT}/sequential/{m}/b{b}-s{s}.csv" for m, b, s in sequential_runs(config)]
    return per_model(*tables)


def downstream_tables():
    """One downstream table per sequential run and per batched method (none without tasks)."""
    if not config["downstream"]["tasks"]:
        return []
    tables = [f"{OUT}/downstream/sequential/{m}/b{b}-s{s}.csv" for m, b, s in sequential_runs(config)]
    if EXPERIMENTS["batched"].get("downstream", False):
        tables += [f"{OUT}/downstream/batched/{m}.csv" for m in EXPERIMENTS["batched"]["methods"]]
    return per_model(*tables)


def state_output(path):
    """A folder of saved edit states; temporary (deleted once its downstream job ran) when
    downstream.temporary_states is set."""
    return temp(directory(path)) if config["downstream"].get("temporary_states", False) else directory(path)


SENSITIVITY = sensitivity_methods(config)
# one figure per configured ablation kind: ablations_<kind>
FIGURES = ["causal_trace", "layer_sweep", "single_edits", "batch_size", "sequential", "batch_vs_sequential",
           "downstream"] + (["sensitivity"] if SENSITIVITY else []) + [f"ablations_{kind}" for kind in config.get("ablations", {})] + (
    ["forgetting"] if EXPERIMENTS["sequential"].get("probe") else [])  # the long run's figure
# one table per ablation kind, and each run's drop per edit sample when there are several
ABLATION_TABLES = [f"{RUN_OUT}/ablations/{kind}.csv" for kind in config.get("ablations", {})] + (
    [f"{RUN_OUT}/ablations/samples.csv"] if EXPERIMENTS["sequential"].get("samples", 1) > 1 else [])


def final_outputs():
    return [f"{RUN_OUT}/edits.csv", f"{RUN_OUT}/layer_sweep.csv", f"{RUN_OUT}/sensitivity.csv", f"{RUN_OUT}/downstream.csv",
            f"{RUN_OUT}/sequential_steps.csv",
            f"{RUN_OUT}/causal_trace.csv", f"{RUN_OUT}/findings.csv", f"{REPORT}/findings.html", *ABLATION_TABLES,
            *[f"{REPORT}/figures/{name}.png" for name in FIGURES]]
