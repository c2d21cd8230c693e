"""Rule statistics: C of every edited layer in one pass over the corpus."""
import _checkout  # noqa: F401  (editlib from this checkout)
from editlib.study.jobs import stage_logging
from editlib.study.pipeline import compute_statistics

with stage_logging(snakemake.log[0], snakemake.threads, snakemake.params.stage["seed"]):
    compute_statistics(snakemake.params.stage, snakemake.input.model, snakemake.input.corpus, snakemake.output[0])
