"""Rule sequential_edits: batches applied one after another (checkpointed, resumable)."""
import _checkout  # noqa: F401  (editlib from this checkout)
from editlib.study.jobs import stage_logging
from editlib.study.pipeline import run_sequential

with stage_logging(snakemake.log[0], snakemake.threads, snakemake.params.stage["seed"]):
    run_sequential(snakemake.params.stage, snakemake.wildcards.method, int(snakemake.wildcards.batch_size),
                   snakemake.input.model, snakemake.input.moments or None, snakemake.input.records,
                   snakemake.input.sweep or None, snakemake.input.mend or None, snakemake.output.results,
                   snakemake.output.states, snakemake.params.checkpoint, sample=int(snakemake.wildcards.sample),
                   # not in params.stage: how often the checkpoint is written changes no result, reruns no job
                   checkpoint_minutes=snakemake.config["experiments"]["sequential"].get("checkpoint_minutes"),
                   steps_path=snakemake.output.steps, corpus_path=snakemake.input.corpus or None)
