"""Rule prepare_model: train the toy-world model, or convert SmolLM2, or save a hub model."""
import _checkout  # noqa: F401  (editlib from this checkout)
from pathlib import Path

from editlib.study.jobs import stage_logging
from editlib.study.pipeline import prepare_model

with stage_logging(snakemake.log[0], snakemake.threads, snakemake.params.stage["seed"]):
    corpus = snakemake.input.get("train_corpus")
    prepare_model(snakemake.params.stage, snakemake.output[0], data_dir=Path(corpus).parent if corpus else None)
