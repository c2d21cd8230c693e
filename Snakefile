# Scaling model editing: stats -> layer sweep -> single / batched / sequential editing ->
# downstream evaluation -> tidy results -> figures -> report. All logic lives in editlib;
# each rule runs a small script under workflow/scripts/. See README.md.
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

from editlib.study.config import validate_config

# config.yaml is the default; a --configfile on the command line REPLACES it (no deep merge, which
# would leak the toy model's hyperparameters into another config's methods).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"

validate_config(config, Path(workflow.current_basedir) / "workflow" / "schemas" / "config.schema.yaml",
                source="config (config.yaml + --configfile/--config overrides)")

report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/statistics.smk"
include: "workflow/rules/tracing.smk"
include: "workflow/rules/editing.smk"
include: "workflow/rules/downstream.smk"
include: "workflow/rules/results.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
