"""Rule batched_edits: each batch size edited into the unedited model."""
import _checkout  # noqa: F401  (editlib from this checkout)
from editlib.study.jobs import stage_logging
from editlib.study.pipeline import run_batched

with stage_logging(snakemake.log[0], snakemake.threads, snakemake.params.stage["seed"]):
    run_batched(snakemake.params.stage, snakemake.wildcards.method, snakemake.input.model,
                snakemake.input.moments or None, snakemake.input.records, snakemake.input.sweep or None,
                snakemake.output.results, snakemake.output.states, snakemake.input.mend or None)
