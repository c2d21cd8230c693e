"""Rule statistics: C of every edited layer in one pass over the corpus."""
from editlib.pipeline import compute_statistics, stage_logging

with stage_logging(snakemake.log[0], snakemake.threads, snakemake.config["seed"]):
    compute_statistics(snakemake.config, snakemake.input.model, snakemake.input.corpus, snakemake.output[0])
