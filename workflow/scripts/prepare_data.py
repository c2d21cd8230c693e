"""Rule prepare_data: edit records, statistics corpus and local lm-eval tasks."""
import _checkout  # noqa: F401  (editlib from this checkout)
from pathlib import Path

from editlib.study.jobs import stage_logging
from editlib.study.pipeline import prepare_data

with stage_logging(snakemake.log[0], snakemake.threads, snakemake.params.stage["seed"]):
    prepare_data(snakemake.params.stage, Path(snakemake.output.records).parent,
                 model_dir=snakemake.input.get("model"))
