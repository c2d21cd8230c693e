"""The resource plan (editlib.study.plan): its jobs are Snakemake's jobs, its set of model-loading rules
is the rule scripts', every job of every paper config fits the SLURM profile, and its costs scale
as the formulas say (linear in the edits)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from editlib.model.architectures import HUB_ARCHITECTURES, parameter_count
from editlib.study import plan

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "workflow" / "profiles" / "slurm"
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
PAPER_CONFIGS = ["llama3-8b", "llama2-7b", "llama2-7b-chat", "llama2-13b"]
LOADERS = {"load_configured_model", "load_context", "load_model"}


def rule_scripts() -> dict[str, set[str]]:
    """rule -> the scripts it runs (workflow/rules/*.smk)."""
    scripts: dict[str, set[str]] = {}
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        for rule, body in re.findall(r"^\s*rule (\w+):\n(.*?)(?=^\s*rule |\Z)", smk.read_text(), re.S | re.M):
            found = re.search(r'script:\s*str\(SCRIPTS / "(\w+\.py)"\)', body)
            scripts.setdefault(rule, set()).add(found.group(1) if found else "")
    return scripts


def loading_functions() -> set[str]:
    """editlib.study.pipeline's functions that load the model, directly or through another of them."""
    tree = ast.parse((REPO / "editlib" / "study" / "pipeline.py").read_text())
    calls = {node.name: {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
             for node in tree.body if isinstance(node, ast.FunctionDef)}
    loading = set(LOADERS)
    while True:
        more = {name for name, called in calls.items() if called & loading} - loading
        if not more:
            return loading
        loading |= more


def script_loads_model(script: str, loading: set[str]) -> bool:
    if not script:
        return False
    tree = ast.parse((REPO / "workflow" / "scripts" / script).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "editlib.study.pipeline" for alias in node.names}
    called = {c.func.id for c in ast.walk(tree) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
    return bool(imported & called & loading)


def test_model_rules_are_the_rules_whose_scripts_load_the_model():
    loading = loading_functions()
    assert "run_sequential" in loading and "run_downstream" in loading and "compute_statistics" in loading
    scripts = rule_scripts()
    loads = {rule for rule, names in scripts.items() if any(script_loads_model(s, loading) for s in names)}
    assert loads == plan.MODEL_RULES | set(plan.CONDITIONAL_MODEL_RULES)


def test_the_profile_gives_a_gpu_to_exactly_the_rules_that_load_the_model():
    rules = set(rule_scripts()) - {"all"}
    resources, retries = plan.profile_resources(PROFILE)
    assert rules == set(resources), "every rule of the workflow has its entry in editlib.study.plan and the profile"
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    for rule in rules:
        gres = profile["set-resources"].get(rule, {}).get("gres")
        if rule in plan.MODEL_RULES:
            assert gres == "gpu:1", rule
            assert resources[rule].partition == "gpu", rule
        else:
            assert gres is None and resources[rule].gpus == 0, rule
    assert retries >= 1  # sequential jobs resume from their checkpoints


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_job_of_a_paper_config_fits_the_profile(name):
    config = plan.load_config(REPO / "configs" / f"{name}.yaml")
    resources, retries = plan.profile_resources(PROFILE)
    minutes = config["experiments"]["sequential"].get("checkpoint_minutes", 30)
    problems = {f"{job.rule} {job.name}": plan.fit(job, resources[job.rule], retries, plan.H100, minutes)
                for job in plan.plan_jobs(config)}
    assert not {k: v for k, v in problems.items() if v}


def test_a_profile_without_gpus_for_downstream_jobs_does_not_fit(tmp_path, capsys):
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    for rule in ("downstream_base", "downstream_sequential", "downstream_batched"):
        profile["set-resources"][rule].pop("gres")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(profile))
    assert plan.main(["--config", str(REPO / "configs" / "llama2-7b.yaml"), "--profile", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT: loads the model but the profile gives it no GPU" in out


def test_the_output_names_the_gpu_the_assumptions_and_the_total(capsys):
    assert plan.main(["--config", str(REPO / "configs" / "llama3-8b.yaml"), "--profile", str(PROFILE)]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H100 SXM5 80 GB" in out and "no GPU run of this project has been measured" in out
    assert re.search(r"total: \d+ jobs, \d+ on a GPU, [\d.]+ GPU-hours", out)
    assert "every job fits the profile" in out
    assert "sequential_edits (42 jobs)" in out and "downstream_sequential (42 jobs)" in out


def snakemake_jobs(config_path: Path, cwd: Path) -> set[tuple]:
    """(rule, wildcards) of every job `snakemake -n` lists."""
    result = subprocess.run([str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--configfile", str(config_path),
                             "-n"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    jobs, rule = set(), None
    for line in result.stdout.splitlines():
        if found := re.match(r"^(?:local)?rule (\w+):", line):
            if rule is not None:
                jobs.add((rule, ()))
            rule = found.group(1)
        elif rule is not None and (found := re.match(r"^\s+wildcards: (.*)$", line)):
            jobs.add((rule, tuple(sorted(tuple(item.split("=", 1)) for item in found.group(1).split(", ")))))
            rule = None
        elif rule is not None and (line.startswith("[") or line.startswith("Job stats")):
            jobs.add((rule, ()))  # a job without wildcards
            rule = None
    return {job for job in jobs if job[0] != "all"}


@pytest.mark.parametrize("name", ["config.yaml", "configs/llama3-8b.yaml", "configs/llama2-7b.yaml"])
def test_the_plan_lists_the_jobs_snakemake_would_run(name, tmp_path):
    config = plan.load_config(REPO / name)
    planned = {(job.rule, tuple(sorted((k, str(v)) for k, v in job.wildcards.items()))) for job in plan.plan_jobs(config)}
    assert planned == snakemake_jobs(REPO / name, tmp_path)


# ---------------------------------------------------------------------------- formulas


def test_parameter_counts_of_the_paper_models():
    counts = {path: parameter_count(arch) for path, arch in HUB_ARCHITECTURES.items()}
    assert counts["meta-llama/Meta-Llama-3-8B"] == 8_030_261_248
    assert counts["meta-llama/Llama-2-7b-hf"] == 6_738_415_616
    assert counts["meta-llama/Llama-2-13b-hf"] == 13_015_864_320


def sequential_hours(config: dict, total: int, eval_at) -> float:
    config = yaml.safe_load(yaml.safe_dump(config))
    sequential = config["experiments"]["sequential"]
    sequential.update(total_edits=total, batch_sizes=[16], downstream_at=[total], methods=["memit"])
    config["metrics"]["generation_entropy"] = False  # scoring alone
    sequential.pop("eval_at", None)
    if eval_at is not None:
        sequential["eval_at"] = eval_at
    job, = [j for j in plan.plan_jobs(config) if j.rule == "sequential_edits"]
    return job.hours


def test_a_sequential_run_costs_linear_in_its_edits_with_eval_at_and_quadratic_without():
    config = plan.load_config(REPO / "configs" / "llama3-8b.yaml")
    linear = sequential_hours(config, 2048, [2048]), sequential_hours(config, 4096, [4096])
    assert 1.8 < linear[1] / linear[0] < 2.2
    quadratic = sequential_hours(config, 2048, None), sequential_hours(config, 4096, None)
    assert quadratic[1] / quadratic[0] > 3.0


def test_statistics_passes_follow_gpu_memory():
    m = plan.dims(HUB_ARCHITECTURES["meta-llama/Meta-Llama-3-8B"], "float32")
    assert plan.statistics_plan(m, 32, 16384, "float32").group_size == 32  # all 32 layers' Grams fit next to the model
    small = replace(plan.H100, memory_gib=48.0)
    memory = plan.statistics_plan(m, 32, 16384, "float32", gpu=small)
    assert 1 <= memory.group_size < 32 and memory.passes == -(-32 // memory.group_size)
    assert memory.gram_bytes == 14336 ** 2 * 4 and memory.model_bytes == m.params * 4
    assert memory.peak_bytes / 2 ** 30 + plan.GPU_OVERHEAD_GIB <= small.memory_gib
    assert plan.statistics_plan(m, 32, 16384, "float32", layers_per_pass=4).passes == 8  # stats.layers_per_pass


def test_tf32_off_makes_float32_jobs_slower():
    config = plan.load_config(REPO / "configs" / "llama2-7b.yaml")
    fast = sum(j.hours for j in plan.plan_jobs(config) if j.rule == "downstream_base")
    config["model"]["tf32"] = False
    slow = sum(j.hours for j in plan.plan_jobs(config) if j.rule == "downstream_base")
    assert slow > 2 * fast


def test_an_unlisted_hub_model_is_sized_from_its_cached_config_json(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    snapshot = tmp_path / "models--org--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    arch = {**HUB_ARCHITECTURES["meta-llama/Llama-2-7b-hf"], "num_hidden_layers": 2}
    (snapshot / "config.json").write_text(__import__("json").dumps(arch))
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    config = {"model": {"source": "hub", "name": "tiny", "path": "org/tiny"}}
    assert plan.architecture(config)["num_hidden_layers"] == 2
    with pytest.raises(ValueError, match="HUB_ARCHITECTURES"):
        plan.architecture({"model": {"source": "hub", "name": "x", "path": "org/unknown"}})


def test_the_plan_imports_no_torch():
    code = ("import sys, io, contextlib\nfrom editlib.study import plan\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            "    plan.main(['--config', 'configs/llama3-8b.yaml'])\nassert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
