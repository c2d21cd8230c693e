"""Rule layer_sweep: single edits at each configured layer for one method."""
import _checkout  # noqa: F401  (editlib from this checkout)
from editlib.study.jobs import stage_logging
from editlib.study.pipeline import run_layer_sweep

with stage_logging(snakemake.log[0], snakemake.threads, snakemake.params.stage["seed"]):
    run_layer_sweep(snakemake.params.stage, snakemake.wildcards.method, snakemake.input.model, snakemake.input.moments,
                    snakemake.input.records, snakemake.output[0])
