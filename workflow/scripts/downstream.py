"""Rules downstream_base, downstream_sequential, downstream_batched: lm-eval on the unedited model,
or on the model with each saved edit state loaded."""
import _checkout  # noqa: F401  (editlib from this checkout)
from editlib.study.jobs import stage_logging
from editlib.study.pipeline import run_downstream, run_downstream_base

with stage_logging(snakemake.log[0], snakemake.threads, snakemake.params.stage["seed"]):
    if snakemake.rule == "downstream_base":
        run_downstream_base(snakemake.params.stage, snakemake.input.model, snakemake.input.tasks,
                            snakemake.output.table, snakemake.output.subtasks, snakemake.output.item_values)
    else:
        run_downstream(snakemake.params.stage, snakemake.params.experiment, snakemake.wildcards.method,
                       int(snakemake.wildcards.get("batch_size", 0)), snakemake.input.model,
                       snakemake.input.moments or None, snakemake.input.mend or None, snakemake.input.tasks,
                       snakemake.input.states, snakemake.input.base, snakemake.output.table,
                       sample=int(snakemake.wildcards.get("sample", 0)), partials_dir=snakemake.params.partials,
                       subtasks_out=snakemake.output.subtasks, base_subtasks_path=snakemake.input.base_subtasks,
                       base_items_path=snakemake.input.base_items)
