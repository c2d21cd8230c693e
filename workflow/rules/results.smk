# Tidy tables of all models, the ablations' tables, figures (with captions for `snakemake --report`).

rule tidy_results:
    input:
        edits=edit_tables(),
        sweeps=per_model(*[f"{OUT}/layer_sweep/{m}.csv" for m in EXPERIMENTS["layer_sweep"]["methods"]]),
        sensitivity=per_model(*[f"{OUT}/sensitivity/{m}.csv" for m in SENSITIVITY]),
        downstream=downstream_tables(),
        # the leaf tasks of configured groups (mmlu's 57 subjects), beside each downstream table
        downstream_subtasks=[table.removesuffix(".csv") + "_subtasks.csv" for table in downstream_tables()],
        traces=per_model(f"{OUT}/causal_trace.csv"),
        steps=per_model(*[f"{OUT}/sequential/{m}/b{b}-s{s}_steps.csv" for m, b, s in sequential_runs(config)]),
    output:
        edits=f"{RUN_OUT}/edits.csv",
        layer_sweep=f"{RUN_OUT}/layer_sweep.csv",
        sensitivity=f"{RUN_OUT}/sensitivity.csv",
        downstream=f"{RUN_OUT}/downstream.csv",
        downstream_subtasks=f"{RUN_OUT}/downstream_subtasks.csv",
        traces=f"{RUN_OUT}/causal_trace.csv",
        steps=f"{RUN_OUT}/sequential_steps.csv",
    log:
        f"{RUN_LOGS}/tidy_results.log",
    benchmark:
        f"{RUN_BENCH}/tidy_results.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "tidy_results.py")


rule figures:
    input:
        edits=f"{RUN_OUT}/edits.csv",
        layer_sweep=f"{RUN_OUT}/layer_sweep.csv",
        sensitivity=f"{RUN_OUT}/sensitivity.csv",
        downstream=f"{RUN_OUT}/downstream.csv",
        traces=f"{RUN_OUT}/causal_trace.csv",
        steps=f"{RUN_OUT}/sequential_steps.csv",
    output:
        **{name: report(f"{REPORT}/figures/{name}.png", category="Figures",
                        caption="../report/ablations.rst" if name.startswith("ablations_") else f"../report/{name}.rst")
           for name in FIGURES},
    params:
        stage=stage_config(config, "figures"),
    log:
        f"{RUN_LOGS}/figures.log",
    benchmark:
        f"{RUN_BENCH}/figures.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "figures.py")


rule findings:
    input:
        edits=f"{RUN_OUT}/edits.csv",
        layer_sweep=f"{RUN_OUT}/layer_sweep.csv",
        downstream=f"{RUN_OUT}/downstream.csv",
        traces=f"{RUN_OUT}/causal_trace.csv",
        steps=f"{RUN_OUT}/sequential_steps.csv",
    output:
        table=f"{RUN_OUT}/findings.csv",
        page=report(f"{REPORT}/findings.html", caption="../report/findings.rst", category="1. Findings"),
        ablations=ABLATION_TABLES,
    params:
        stage=stage_config(config, "report"),
    log:
        f"{RUN_LOGS}/findings.log",
    benchmark:
        f"{RUN_BENCH}/findings.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "findings.py")
