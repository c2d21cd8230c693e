# Second-moment statistics C of every edited layer, in one pass over the corpus per group of layers
# (all layers unless GPU memory or stats.layers_per_pass says otherwise; cached per layer).

rule statistics:
    input:
        model=MODEL,
        corpus=DATA["corpus"],
    output:
        MOMENTS,
    params:
        stage=stage("statistics"),
    threads: config["threads"]
    priority: 100  # every locate-and-edit job waits for it
    log:
        f"{LOGS}/statistics.log",
    benchmark:
        f"{BENCH}/statistics.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "statistics.py")
