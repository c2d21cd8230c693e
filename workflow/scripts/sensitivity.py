"""Rule sensitivity: single edits with one hyperparameter of the method swept."""
import _checkout  # noqa: F401  (editlib from this checkout)
from editlib.study.jobs import stage_logging
from editlib.study.pipeline import run_sensitivity

with stage_logging(snakemake.log[0], snakemake.threads, snakemake.params.stage["seed"]):
    run_sensitivity(snakemake.params.stage, snakemake.wildcards.method, snakemake.input.model, snakemake.input.moments,
                    snakemake.input.records, snakemake.input.sweep or None, snakemake.output[0])
