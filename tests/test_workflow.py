"""The real Snakemake DAG on a very small config: dry run, full run, no-op rerun, --forcerun,
a hyperparameter change that reruns only its method, downstream settings that rerun only the
downstream jobs, the HTML report, and config errors."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")

SMALL = {
    "run": "tiny",
    "seed": 0,
    "threads": 1,
    "model": {"source": "toyworld", "name": "tiny-llama", "dtype": "float32", "device": "cpu",
              "train": {"layers": 2, "hidden": 64, "intermediate": 256, "heads": 4, "vocab_size": 768,
                        "steps": 150, "warmup_steps": 20, "batch_size": 32, "threads": 1, "recall_threshold": 0.0}},
    "data": {"source": "toyworld", "world": {"seed": 0, "n_subjects": 40}},
    "stats": {"corpus": "data", "n_samples": 40, "max_length": 64},
    "tracing": {"n_facts": 4, "n_samples": 2},
    "metrics": {"generation_entropy": False},
    "downstream": {"tasks": ["toy_facts"], "limit": 8, "batch_size": 8, "num_fewshot": 0},
    "methods": {
        "rome": {"layers": [0], "targets": {"v_num_grad_steps": 4}},
        "memit": {"layers": "auto", "mom2_update_weight": 10.0, "targets": {"v_num_grad_steps": 4}},
        "grace": {"layers": [1], "n_iter": 5},
        "mend": {"n_train": 8, "n_eval": 4, "hparams": {"rank": 8, "steps": 2, "batch_size": 2, "log_every": 1,
                                                         "n_edit_layers": 1, "lr": 1e-3, "lr_lr": 1e-2, "edit_lr": 1e-3}},
    },
    "experiments": {
        "layer_sweep": {"methods": ["memit"], "layers": [0, 1], "n_records": 2, "criterion": "S"},
        "single": {"methods": ["rome"], "n_records": 2},
        "batched": {"methods": ["memit"], "batch_sizes": [1, 2], "n_records": 2, "downstream": True},
        "sequential": {"methods": ["memit", "grace", "mend"], "batch_sizes": [2], "total_edits": 4,
                       "downstream_at": [0, 4]},
    },
}
STAGES = {"prepare_data", "prepare_model", "statistics", "causal_trace", "layer_sweep", "single_edits",
          "batched_edits", "sequential_edits", "train_mend", "downstream_base", "downstream_batched",
          "downstream_sequential", "tidy_results", "figures", "findings", "all"}


def snakemake(workdir: Path, config: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    config_path = workdir / "test-config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "PATH": f"{SNAKEMAKE.parent}{os.pathsep}{os.environ['PATH']}"}
    command = [str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(config_path), "--cores", "2", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=workdir, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def planned_jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """{rule: count} from a dry run's job-stats table (empty when nothing is to be done)."""
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^([a-z_]+)\s+(\d+)\s*$", table, re.M) if m.group(1) != "total"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    return workdir


@pytest.fixture(scope="module")
def completed(workdir) -> Path:
    dry = snakemake(workdir, SMALL, "-n")
    assert set(planned_jobs(dry)) == STAGES, planned_jobs(dry)
    snakemake(workdir, SMALL)
    return workdir


def test_dry_run_lists_every_stage(tmp_path):
    jobs = planned_jobs(snakemake(tmp_path, SMALL, "-n"))
    assert set(jobs) == STAGES, jobs
    assert jobs["sequential_edits"] == 3 and jobs["layer_sweep"] == 1, jobs  # 3 methods x 1 batch size


def test_snakemake_lint_is_clean(tmp_path):
    """Every rule has log, benchmark and a conda environment; no lint of Snakemake's best practices."""
    result = snakemake(tmp_path, SMALL, "--lint", check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_full_run_writes_tidy_tables_and_figures(completed):
    out = completed / "results" / "tiny"
    edits = pd.read_csv(out / "edits.csv", dtype={"layers": str})
    assert {"experiment", "model", "method", "layers", "batch_size", "n_edits", "step", "ES", "PS", "NS", "S"} <= set(edits.columns)
    assert set(edits["experiment"]) == {"single", "batched", "sequential"}
    sequential = edits[edits["experiment"] == "sequential"]
    assert set(sequential["method"]) == {"memit", "grace", "mend"}
    assert sorted(sequential.loc[sequential["method"] == "memit", "n_edits"].unique()) == [2, 4]
    sweep = pd.read_csv(out / "layer_sweep.csv")
    assert sorted(sweep["layers"].astype(int)) == [0, 1]
    best = str(int(sweep.sort_values(["S", "layers"], ascending=[False, True]).iloc[0]["layers"]))
    assert set(edits.loc[edits["method"] == "memit", "layers"]) == {best}
    downstream = pd.read_csv(out / "downstream.csv")
    assert downstream["error"].isna().all() and set(downstream["task"]) == {"toy_facts"}
    # the toy tasks are plain tasks: the subtask table holds no row, only its columns
    assert list(pd.read_csv(out / "downstream_subtasks.csv").columns)[-8:] == ["group", "task", "metric",
                                                                               "higher_is_better", "value", "stderr",
                                                                               "change_stderr", "n_items"]
    # every edit state's change from the unedited model paired question by question
    assert downstream["change_stderr"].notna().all()
    assert downstream.loc[downstream["n_edits"] == 0, "change_stderr"].eq(0).all()
    assert downstream.loc[downstream["n_edits"] > 0, "change_stderr"].gt(0).all()
    assert downstream["higher_is_better"].eq(True).all()  # every row: the unedited model's, and each edit state's
    seq = downstream[(downstream["experiment"] == "sequential") & (downstream["metric"] == "acc")]
    assert sorted(seq.loc[seq["method"] == "grace", "n_edits"]) == [0, 4]
    assert seq["value"].between(0, 1).all()
    for name in ("causal_trace", "layer_sweep", "single_edits", "batch_size", "sequential", "downstream",
                 "batch_vs_sequential"):
        assert (completed / "reports" / "tiny" / "figures" / f"{name}.png").stat().st_size > 1000
    assert (completed / "logs" / "tiny" / "tiny-llama" / "statistics.log").exists()
    assert (completed / "benchmarks" / "tiny" / "tiny-llama" / "statistics.tsv").exists()
    own = out / "tiny-llama"  # the model's own files
    assert not [p for p in (own / "checkpoints").rglob("*") if p.is_file()], "checkpoints left behind"
    # the edit states the downstream jobs loaded: one per downstream_at count > 0 and per batch size
    assert sorted(p.name for p in (own / "states" / "sequential" / "grace" / "b2-s0").glob("*.safetensors")) == ["n4.safetensors"]
    assert sorted(p.name for p in (own / "states" / "batched" / "memit").glob("*.safetensors")) == ["b1.safetensors", "b2.safetensors"]
    # z of the unedited model was optimised once per (module, block) and shared by the sweep, the
    # batched run and the first sequential batch: MEMIT at blocks 0 and 1 (sweep), ROME at MLP 0
    assert len(list((completed / ".cache" / "targets").glob("z-*.safetensors"))) == 3


def test_rerun_after_success_does_nothing(completed):
    assert planned_jobs(snakemake(completed, SMALL, "-n")) == {}


def test_forcerun_reruns_the_stage_and_its_dependents_only(completed):
    jobs = planned_jobs(snakemake(completed, SMALL, "-n", "--forcerun", "single_edits"))
    assert set(jobs) == {"single_edits", "tidy_results", "figures", "findings", "all"}, jobs


def test_hyperparameter_change_reruns_only_that_method(completed):
    changed = copy.deepcopy(SMALL)
    changed["methods"]["grace"]["n_iter"] = 6
    jobs = planned_jobs(snakemake(completed, changed, "-n"))
    assert jobs == {"sequential_edits": 1, "downstream_sequential": 1, **REPORTING}, jobs


REPORTING = {"tidy_results": 1, "figures": 1, "findings": 1, "all": 1}
DOWNSTREAM = {"downstream_batched": 1, "downstream_sequential": 3}  # SMALL: memit batched; 3 sequential runs
# (config path, new value) -> the jobs that read it (SMALL: memit swept, batched and sequential;
# rome single; grace and mend sequential; one batch size)
CHANGES = [
    # an edit job that reruns rewrites its states, so the downstream job reading them reruns too
    ("metrics.generation_entropy", True,
     {"layer_sweep": 1, "single_edits": 1, "batched_edits": 1, "sequential_edits": 3, **DOWNSTREAM, **REPORTING}),
    ("tracing.n_samples", 3, {"causal_trace": 1, **REPORTING}),
    # downstream settings rerun the downstream jobs and no edit
    ("downstream.limit", 4, {"downstream_base": 1, **DOWNSTREAM, **REPORTING}),
    ("downstream.tasks", ["toy_facts", "toy_compose"], {"downstream_base": 1, **DOWNSTREAM, **REPORTING}),
    ("downstream.num_fewshot", None, {"downstream_base": 1, **DOWNSTREAM, **REPORTING}),
    ("downstream.confirm_run_unsafe_code", True, {"downstream_base": 1, **DOWNSTREAM, **REPORTING}),
    # whether the states are deleted after use changes no result: nothing reruns
    ("downstream.temporary_states", True, {}),
    ("experiments.single.n_records", 1, {"single_edits": 1, **REPORTING}),
    # the sweep itself does not read the criterion; the jobs whose layer it picks do
    ("experiments.layer_sweep.criterion", "ES", {"batched_edits": 1, "sequential_edits": 1, "downstream_batched": 1,
                                                 "downstream_sequential": 1, **REPORTING}),
    # adding a method to an experiment adds its job and reruns no other method's
    ("experiments.single.methods", ["rome", "memit"], {"single_edits": 1, **REPORTING}),
    ("experiments.sequential.method_batch_sizes", {"grace": [2, 4]}, {"sequential_edits": 1,
                                                                       "downstream_sequential": 1, **REPORTING}),
    ("experiments.sequential.eval_at", [2], {"sequential_edits": 3, "downstream_sequential": 3, **REPORTING}),
    ("stats.n_samples", 30, {"statistics": 1, "layer_sweep": 1, "single_edits": 1, "batched_edits": 1,
                             "sequential_edits": 1, "downstream_batched": 1, "downstream_sequential": 1, **REPORTING}),
    ("methods.mend.n_train", 6, {"train_mend": 1, "sequential_edits": 1, "downstream_sequential": 1, **REPORTING}),
    # a second edit sample adds one run per method and batch size; MEND's training pool moves past it
    ("experiments.sequential.samples", 2, {"train_mend": 1, "sequential_edits": 4, "downstream_sequential": 4,
                                           **REPORTING}),
    # a second model runs every per-model job once and changes none of the first model's
    ("models", {"tiny-chat": {"train": {"dialogue_steps": 20}}},
     {"prepare_data": 1, "prepare_model": 1, "statistics": 1, "causal_trace": 1, "layer_sweep": 1, "single_edits": 1,
      "batched_edits": 1, "sequential_edits": 3, "train_mend": 1, "downstream_base": 1, **DOWNSTREAM, **REPORTING}),
    # MEND trains on the records after those the experiments edit: more edits move its pool
    ("experiments.sequential.total_edits", 6, {"train_mend": 1, "sequential_edits": 3, "downstream_sequential": 3,
                                               **REPORTING}),
    # a figure range is read by the figures job alone
    ("figures", {"y_limits": {"S": [50, 100]}}, {"figures": 1, "all": 1}),
]


@pytest.mark.parametrize("path, value, expected", CHANGES, ids=[change[0] for change in CHANGES])
def test_a_config_change_reruns_exactly_the_jobs_that_read_it(completed, path, value, expected):
    changed = copy.deepcopy(SMALL)
    *parents, last = path.split(".")
    node = changed
    for key in parents:
        node = node[key]
    node[last] = value
    assert planned_jobs(snakemake(completed, changed, "-n")) == expected


def test_report_is_written(completed):
    report = completed / "reports" / "tiny" / "report.html"
    snakemake(completed, SMALL, "--report", str(report))
    assert report.stat().st_size > 10_000


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["experiments"]["sequential"]["methods"].append("memitt"), r"experiments\.sequential\.methods\[3\]"),
    (lambda c: c["experiments"]["layer_sweep"]["layers"].append(7), r"layer_sweep\.layers\[2\]: layer 7 out of range"),
    (lambda c: c["methods"]["memit"].update(layers=[0, 9]), r"methods\.memit\.layers\[1\]: layer 9 out of range"),
    (lambda c: c["stats"].pop("n_samples"), r"stats: 'n_samples' is a required property"),
    (lambda c: c.update(figures={"y_limits": {"ES": [100, 0]}}), r"figures\.y_limits\.ES: \[100, 0\] must be"),
])
def test_invalid_config_fails_before_any_job(tmp_path, mutate, message):
    bad = copy.deepcopy(SMALL)
    mutate(bad)
    result = snakemake(tmp_path, bad, "-n", check=False)
    assert result.returncode != 0
    assert re.search(message, result.stdout + result.stderr), result.stderr[-3000:]
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


def test_a_method_variant_adds_exactly_its_own_jobs(completed):
    """A second MEMIT block (`method: memit`, other layers) runs as its own method: one new job,
    the existing MEMIT jobs untouched, its rows labelled with the variant's name."""
    changed = copy.deepcopy(SMALL)
    changed["methods"]["memit-both"] = {"method": "memit", "layers": [0, 1], "mom2_update_weight": 10.0,
                                        "targets": {"v_num_grad_steps": 4}}
    changed["experiments"]["single"]["methods"].append("memit-both")
    assert planned_jobs(snakemake(completed, changed, "-n")) == {"single_edits": 1, **REPORTING}
    snakemake(completed, changed)
    edits = pd.read_csv(completed / "results" / "tiny" / "edits.csv", dtype={"layers": str})
    variant = edits[edits["method"] == "memit-both"]
    assert variant[["experiment", "layers"]].values.tolist() == [["single", "0,1"]]
    assert set(edits["method"]) >= {"memit", "memit-both", "rome"}


@pytest.mark.slow  # about 1.5 minutes: in `make test-all` and CI
def test_zsre_records_run_end_to_end(tmp_path):
    """data.records: zsre edits and scores the toy world's ZsRE questions in every experiment."""
    config = copy.deepcopy(SMALL)
    config["data"].update(records="zsre", zsre_target="alt")
    del config["methods"]["mend"]
    config["experiments"]["sequential"]["methods"] = ["memit", "grace"]
    snakemake(tmp_path, config)
    out = tmp_path / "results" / "tiny"
    edits = pd.read_csv(out / "edits.csv")
    assert set(edits["records"]) == {"zsre"} and set(edits["experiment"]) == {"single", "batched", "sequential"}
    assert edits[["ES", "PS", "NS"]].stack().between(0, 100).all() and edits["EM"].isna().all()
    assert set(pd.read_csv(out / "layer_sweep.csv")["records"]) == {"zsre"}
    # tracing reads the same records: ZsRE edited towards `alt` keeps the true answer to trace with
    # (this small model answers none of the questions: it never saw one in training)
    assert "causal tracing: the model knows" in (tmp_path / "logs" / "tiny" / "tiny-llama" / "causal_trace.log").read_text()


@pytest.mark.slow  # about 3 minutes of 35 jobs: in `make test-all` and CI; `make test` dry-runs the same features
def test_models_samples_and_ablations_run_end_to_end(tmp_path):
    """Two models (the second a "chat" variant trained further on the world's dialogues), two
    disjoint edit samples per sequential run, the instruction-tuning and batch-size ablations and a
    sensitivity grid: every model and sample in the tables, one tidy table per ablation, the
    figures faceted."""
    config = copy.deepcopy(SMALL)
    del config["methods"]["mend"]
    config["models"] = {"tiny-chat": {"train": {"dialogue_steps": 20, "seq_len": 64}}}  # this vocabulary splits names
    config["experiments"]["sequential"].update(methods=["memit"], batch_sizes=[1, 2], samples=2)
    config["experiments"]["batched"]["downstream"] = False  # what this test reads comes from the sequential runs
    config["ablations"] = {"instruction_tuning": [{"base": "tiny-llama", "chat": "tiny-chat"}], "batch_size": ["memit"]}
    config["experiments"]["sensitivity"] = {"n_records": 2, "grid": {"memit": {"mom2_update_weight": [1.0, 10.0]}}}
    snakemake(tmp_path, config)
    out = tmp_path / "results" / "tiny"
    edits = pd.read_csv(out / "edits.csv")
    assert set(edits["model"]) == {"tiny-llama", "tiny-chat"}
    sequential = edits[edits["experiment"] == "sequential"]
    assert sorted(sequential.groupby(["model", "method", "batch_size"])["sample"].nunique().unique()) == [2]
    recall = yaml.safe_load((tmp_path / "resources" / "tiny" / "tiny-chat" / "model" / "recall.json").read_text())
    assert recall["train_config"]["dialogue_steps"] == 20
    downstream = pd.read_csv(out / "downstream.csv")
    assert set(downstream["model"]) == {"tiny-llama", "tiny-chat"} and set(downstream["sample"]) == {0, 1}
    tuning = pd.read_csv(out / "ablations" / "instruction_tuning.csv")
    assert set(tuning["role"]) == {"base", "chat"} and set(tuning["sample"]) == {0, 1}
    assert set(pd.read_csv(out / "ablations" / "batch_size.csv")["role"]) == {"b=1", "b=2"}
    assert set(pd.read_csv(out / "ablations" / "samples.csv")["sample"]) == {0, 1}
    findings = pd.read_csv(out / "findings.csv")
    assert "instruction-tuned models lose less general ability" in set(findings["finding"])
    assert set(findings["model"].dropna()) >= {"tiny-llama", "tiny-chat"}
    sensitivity = pd.read_csv(out / "sensitivity.csv")
    assert sorted(zip(sensitivity["model"], sensitivity["value"])) == [("tiny-chat", 1.0), ("tiny-chat", 10.0),
                                                                       ("tiny-llama", 1.0), ("tiny-llama", 10.0)]
    for name in ("ablations_instruction_tuning", "ablations_batch_size", "downstream", "causal_trace", "sensitivity"):
        assert (tmp_path / "reports" / "tiny" / "figures" / f"{name}.png").stat().st_size > 1000
