"""Rule tidy_results: one table per kind of result under results/<run>/, all models together."""
import _checkout  # noqa: F401  (editlib from this checkout)
from editlib.study.jobs import stage_logging
from editlib.study.tables import (
    DOWNSTREAM_COLUMNS,
    DOWNSTREAM_SUBTASK_COLUMNS,
    RESULT_COLUMNS,
    SENSITIVITY_COLUMNS,
    STEP_COLUMNS,
    tidy,
)

with stage_logging(snakemake.log[0], uses_torch=False):
    tidy(snakemake.input.edits, snakemake.output.edits, RESULT_COLUMNS)
    tidy(snakemake.input.sweeps, snakemake.output.layer_sweep, RESULT_COLUMNS)
    tidy(snakemake.input.sensitivity, snakemake.output.sensitivity, SENSITIVITY_COLUMNS)
    tidy(snakemake.input.downstream, snakemake.output.downstream, DOWNSTREAM_COLUMNS)
    tidy(snakemake.input.downstream_subtasks, snakemake.output.downstream_subtasks, DOWNSTREAM_SUBTASK_COLUMNS)
    tidy(snakemake.input.traces, snakemake.output.traces)
    tidy(snakemake.input.steps, snakemake.output.steps, STEP_COLUMNS)
