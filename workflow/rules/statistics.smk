# Second-moment statistics C of every edited layer, in ONE pass over the corpus (cached per layer).

rule statistics:
    input:
        model=MODEL,
        corpus=DATA["corpus"],
    output:
        MOMENTS,
    params:
        stats=config["stats"],
        layers=lambda wildcards: sorted(set(EXPERIMENTS["layer_sweep"]["layers"]) | {
            layer for block in config["methods"].values()
            if isinstance(block.get("layers"), list) for layer in block["layers"]}),
    threads: config["threads"]
    log:
        f"{LOGS}/statistics.log",
    benchmark:
        f"{BENCH}/statistics.tsv"
    script:
        str(SCRIPTS / "statistics.py")
