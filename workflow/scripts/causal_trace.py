"""Rule causal_trace: indirect effects of restoring states of corrupted runs, per fact and layer."""
import _checkout  # noqa: F401  (editlib from this checkout)
from editlib.study.jobs import stage_logging
from editlib.study.pipeline import run_causal_trace

with stage_logging(snakemake.log[0], snakemake.threads, snakemake.params.stage["seed"]):
    run_causal_trace(snakemake.params.stage, snakemake.input.model, snakemake.input.records, snakemake.output[0])
