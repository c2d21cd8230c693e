# Paths and helpers shared by the rules. Everything of one run lives under results/<run>,
# resources/<run>, reports/<run>, logs/<run> and benchmarks/<run>.

import re

from editlib.config import configured_method, sequential_runs, stage_config

RUN = config["run"]
RES = f"resources/{RUN}"
OUT = f"results/{RUN}"
REPORT = f"reports/{RUN}"
LOGS = f"logs/{RUN}"
BENCH = f"benchmarks/{RUN}"
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
# the {method} wildcard: exactly the config's method blocks (validated against editlib.methods)
METHOD_WILDCARD = "|".join(re.escape(name) for name in config["methods"])


def sweep_input(wildcards):
    """The method's own layer-sweep table when its layers are 'auto', else nothing."""
    method = configured_method(config, wildcards.method)
    if not method.chooses_layers or config["methods"][wildcards.method].get("layers", "auto") != "auto":
        return []
    return f"{OUT}/layer_sweep/{wildcards.method}.csv"


def mend_input(wildcards):
    """The trained hypernetwork, for a method that needs one (MEND)."""
    return MEND_EDITOR if configured_method(config, wildcards.method).trained_editor else []


def moments_input(wildcards):
    """The statistics C, for a method that uses them (the locate-and-edit family)."""
    return MOMENTS if configured_method(config, wildcards.method).uses_statistics else []


def edit_tables():
    tables = [f"{OUT}/single/{m}.csv" for m in EXPERIMENTS["single"]["methods"]]
    tables += [f"{OUT}/batched/{m}.csv" for m in EXPERIMENTS["batched"]["methods"]]
    tables += [f"{OUT}/sequential/{m}/b{b}.csv" for m, b in sequential_runs(config)]
    return tables


def downstream_tables():
    """One downstream table per sequential run and per batched method (none without tasks)."""
    if not config["downstream"]["tasks"]:
        return []
    tables = [f"{OUT}/downstream/sequential/{m}/b{b}.csv" for m, b in sequential_runs(config)]
    if EXPERIMENTS["batched"].get("downstream", False):
        tables += [f"{OUT}/downstream/batched/{m}.csv" for m in EXPERIMENTS["batched"]["methods"]]
    return tables


def state_output(path):
    """A folder of saved edit states; temporary (deleted once its downstream job ran) when
    downstream.temporary_states is set."""
    return temp(directory(path)) if config["downstream"].get("temporary_states", False) else directory(path)


FIGURES = ["causal_trace", "layer_sweep", "single_edits", "batch_size", "sequential", "batch_vs_sequential",
           "downstream"] + (["ablations"] if config.get("ablations") else [])


def final_outputs():
    return [f"{OUT}/edits.csv", f"{OUT}/layer_sweep.csv", f"{OUT}/downstream.csv", f"{OUT}/causal_trace.csv",
            f"{OUT}/findings.csv", f"{REPORT}/findings.html", *[f"{REPORT}/figures/{name}.png" for name in FIGURES]]
