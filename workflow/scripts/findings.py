"""Rule findings: each paper finding tested on this run's tables, with its numbers and a verdict."""
import _checkout  # noqa: F401  (editlib from this checkout)
from editlib.findings import assess, write_findings_html
from editlib.io import write_csv
from editlib.pipeline import stage_logging
from editlib.experiments import read_results

with stage_logging(snakemake.log[0]):
    findings = assess({name: read_results(path) for name, path in snakemake.input.items()},
                      snakemake.params.stage.get("ablations"))
    write_csv(snakemake.output.table, findings)
    write_findings_html(findings, snakemake.output.page, title=snakemake.params.stage["run"])
