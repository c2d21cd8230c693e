from editlib.config import statistics_layers

# Second-moment statistics C of every edited layer, in ONE pass over the corpus (cached per layer).

rule statistics:
    input:
        model=MODEL,
        corpus=DATA["corpus"],
    output:
        MOMENTS,
    params:
        stats=config["stats"],
        layers=statistics_layers(config),
    threads: config["threads"]
    log:
        f"{LOGS}/statistics.log",
    benchmark:
        f"{BENCH}/statistics.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "statistics.py")
