"""Rule single_edits: one fact at a time, the model restored between facts."""
import _checkout  # noqa: F401  (editlib from this checkout)
from editlib.study.jobs import stage_logging
from editlib.study.pipeline import run_single

with stage_logging(snakemake.log[0], snakemake.threads, snakemake.params.stage["seed"]):
    run_single(snakemake.params.stage, snakemake.wildcards.method, snakemake.input.model,
               snakemake.input.moments or None, snakemake.input.records, snakemake.input.sweep or None,
               snakemake.output[0], snakemake.input.mend or None)
