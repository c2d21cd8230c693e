"""Rule figures: the papers' plots from the tidy tables."""
import _checkout  # noqa: F401  (editlib from this checkout)
from editlib.study.jobs import stage_logging
from editlib.study.plotting import write_figures

with stage_logging(snakemake.log[0], uses_torch=False):
    stage = snakemake.params.stage
    write_figures(dict(snakemake.input.items()), dict(snakemake.output.items()), title=stage["run"],
                  ablations=stage.get("ablations"), y_limits=stage.get("figures", {}).get("y_limits"))
