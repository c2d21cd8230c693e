"""The SLURM profile drives snakemake-executor-plugin-slurm against stub sbatch/sacct/scontrol/
sinfo/squeue/sacctmgr/sshare on PATH; the submission must be well-formed (resources, GPU, the
job's own snakemake call)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
STUB = """#!{python}
import json, os, sys
name = os.path.basename(sys.argv[0])
stdin = "" if sys.stdin.isatty() else sys.stdin.read()
with open(os.environ["SLURM_STUB_LOG"], "a") as log:
    log.write(json.dumps({{"cmd": name, "args": sys.argv[1:], "stdin": stdin}}) + "\\n")
args = " ".join(sys.argv[1:])
if name == "sbatch":
    print("4242")
elif name == "sacct" and "Account" in args:
    print("stub_account")
elif name == "sacct" and "JobIdRaw,State" in args:
    print("4242|FAILED")
elif name == "sacctmgr":
    print("stub_account")
elif name == "scontrol":
    print("MinJobAge = 300 sec")
"""


def submit(tmp_path, until: str, prepared: bool = False):
    """Run the profile against the stubs up to rule `until`; the sbatch calls' argument lists,
    the stub log's calls and the result. `prepared`: the toy run's model and data folders exist
    already, so a job that reads them is submitted first."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "stub"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    for command in ("sbatch", "sacct", "squeue", "scontrol", "sinfo", "sacctmgr", "sshare", "srun", "scancel"):
        (bin_dir / command).symlink_to(stub)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["run"] = "slurm-stub"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    if prepared:
        resources = tmp_path / "resources" / "slurm-stub" / "toy-5L"
        (resources / "data" / "tasks").mkdir(parents=True)
        for name in ("records.json", "corpus.jsonl", "summary.json", "train_corpus.txt"):
            (resources / "data" / name).write_text("{}")
        (resources / "model").mkdir()
        os.utime(resources / "model", (time.time() + 60, time.time() + 60))  # newer than its input
    log = tmp_path / "stub.log"
    env = {**os.environ, "SLURM_STUB_LOG": str(log), "PATH": f"{bin_dir}{os.pathsep}{SNAKEMAKE.parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--profile", str(REPO / "workflow/profiles/slurm"),
         "--configfile", "c.yaml", "--until", until, "--retries", "0", "--latency-wait", "1",
         "--slurm-status-command", "sacct", "--slurm-init-seconds-before-status-checks", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    submissions = [shlex.split(" ".join(shlex.quote(a) for a in call["args"])) for call in calls if call["cmd"] == "sbatch"]
    return submissions, calls, result


def test_slurm_submission_is_well_formed(tmp_path):
    submissions, calls, result = submit(tmp_path, "prepare_data")
    assert len(submissions) == 1, calls
    argv = submissions[0]
    text = " ".join(argv)
    # set-resources: prepare_data loads no model (a download): the cpu partition, no GPU
    assert not any(a.startswith("--gres") or a == "--gpus" for a in argv), text
    assert ["-p", "cpu"] == argv[argv.index("-p"):argv.index("-p") + 2]
    assert ["--mem", "16000"] == argv[argv.index("--mem"):argv.index("--mem") + 2]
    assert ["-t", "240"] == argv[argv.index("-t"):argv.index("-t") + 2]
    assert ["-A", "stub_account"] == argv[argv.index("-A"):argv.index("-A") + 2]
    comment = argv[argv.index("--comment") + 1]
    assert "--cpus-per-task=8" in argv and comment.startswith("rule_prepare_data"), text
    wrap = next(a for a in argv if a.startswith("--wrap="))
    assert "-m snakemake" in wrap and f"--snakefile '{REPO / 'Snakefile'}'" in wrap
    assert "--target-jobs 'prepare_data:model=toy-5L'" in wrap and "--allowed-rules prepare_data" in wrap
    # the job never ran (stub), so snakemake reports the SLURM failure and exits non-zero
    assert result.returncode != 0 and "4242" in result.stdout + result.stderr
    assert not (tmp_path / "resources" / "slurm-stub" / "toy-5L" / "data" / "records.json").exists()


def test_a_job_that_loads_the_model_gets_a_gpu(tmp_path):
    submissions, calls, result = submit(tmp_path, "causal_trace", prepared=True)
    assert len(submissions) == 1, calls
    argv = submissions[0]
    text = " ".join(argv)
    assert argv[argv.index("--comment") + 1].startswith("rule_causal_trace"), text
    assert "--gres=gpu:1" in argv, text
    assert ["-p", "gpu"] == argv[argv.index("-p"):argv.index("-p") + 2]
    assert ["-t", "180"] == argv[argv.index("-t"):argv.index("-t") + 2]
