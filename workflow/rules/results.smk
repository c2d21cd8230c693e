# Tidy tables, figures (with captions for `snakemake --report`).

rule tidy_results:
    input:
        edits=edit_tables(),
        sweeps=[f"{OUT}/layer_sweep/{m}.csv" for m in EXPERIMENTS["layer_sweep"]["methods"]],
        downstream=downstream_tables(),
    output:
        edits=f"{OUT}/edits.csv",
        layer_sweep=f"{OUT}/layer_sweep.csv",
        downstream=f"{OUT}/downstream.csv",
    log:
        f"{LOGS}/tidy_results.log",
    benchmark:
        f"{BENCH}/tidy_results.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "tidy_results.py")


rule figures:
    input:
        edits=f"{OUT}/edits.csv",
        layer_sweep=f"{OUT}/layer_sweep.csv",
        downstream=f"{OUT}/downstream.csv",
        traces=f"{OUT}/causal_trace.csv",
    output:
        **{name: report(f"{REPORT}/figures/{name}.png", caption=f"../report/{name}.rst", category="Figures")
           for name in FIGURES},
    params:
        stage=stage_config(config, "report"),
    log:
        f"{LOGS}/figures.log",
    benchmark:
        f"{BENCH}/figures.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "figures.py")


rule findings:
    input:
        edits=f"{OUT}/edits.csv",
        layer_sweep=f"{OUT}/layer_sweep.csv",
        downstream=f"{OUT}/downstream.csv",
        traces=f"{OUT}/causal_trace.csv",
    output:
        table=f"{OUT}/findings.csv",
        page=report(f"{REPORT}/findings.html", caption="../report/findings.rst", category="1. Findings"),
    params:
        stage=stage_config(config, "report"),
    log:
        f"{LOGS}/findings.log",
    benchmark:
        f"{BENCH}/findings.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "findings.py")
