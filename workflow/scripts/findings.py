"""Rule findings: each paper finding tested on this run's tables, with its numbers and a verdict;
and one tidy table per configured ablation."""
import _checkout  # noqa: F401  (editlib from this checkout)
from editlib.study.ablations import ablation_tables, sample_table
from editlib.study.findings import assess, write_findings_html
from editlib.io import write_csv
from editlib.study.jobs import stage_logging
from editlib.study.tables import read_results

with stage_logging(snakemake.log[0], uses_torch=False):
    tables = {name: read_results(path) for name, path in snakemake.input.items()}
    ablations = ablation_tables(tables["downstream"], snakemake.params.stage.get("ablations"))
    written = {**ablations, "samples": sample_table(tables["downstream"])}  # samples.csv: with several edit samples
    for path in snakemake.output.ablations:
        write_csv(path, written[path.rsplit("/", 1)[-1].removesuffix(".csv")])
    findings = assess(tables, ablations)
    write_csv(snakemake.output.table, findings)
    write_findings_html(findings, snakemake.output.page, title=snakemake.params.stage["run"])
