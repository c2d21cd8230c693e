"""Rule train_mend: train the MEND hypernetwork on records no experiment edits."""
import _checkout  # noqa: F401  (editlib from this checkout)
from editlib.study.jobs import stage_logging
from editlib.study.pipeline import train_mend_editor

with stage_logging(snakemake.log[0], snakemake.threads, snakemake.params.stage["seed"]):
    train_mend_editor(snakemake.params.stage, snakemake.input.model, snakemake.input.records, snakemake.output[0])
