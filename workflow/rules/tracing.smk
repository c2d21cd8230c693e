# Causal tracing (Meng et al. 2022): where the model reads the facts it knows.

rule causal_trace:
    input:
        model=MODEL,
        records=DATA["records"],
    output:
        f"{OUT}/causal_trace.csv",
    params:
        stage=stage("causal_trace"),
    threads: config["threads"]
    log:
        f"{LOGS}/causal_trace.log",
    benchmark:
        f"{BENCH}/causal_trace.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "causal_trace.py")
