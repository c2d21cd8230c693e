# Model and data preparation: the toy world (default) or the offline real assets.

if TOY_WORLD:

    rule prepare_data:
        output:
            records=DATA["records"],
            corpus=DATA["corpus"],
            tasks=directory(DATA["tasks"]),
            summary=DATA["summary"],
            train_corpus=f"{RES}/data/train_corpus.txt",
        params:
            stage=stage("prepare_data"),
        log:
            f"{LOGS}/prepare_data.log",
        benchmark:
            f"{BENCH}/prepare_data.tsv"
        conda:
            CONDA_ENV
        script:
            str(SCRIPTS / "prepare_data.py")

    rule prepare_model:
        input:
            train_corpus=f"{RES}/data/train_corpus.txt",
        output:
            directory(MODEL),
        params:
            stage=stage("prepare_model"),
        threads: lambda wildcards: model_config(config, wildcards.model)["model"].get("train", {}).get("threads", 1)
        priority: 200  # every model's jobs wait for it: train all models before the 1-thread jobs fill the cores
        log:
            f"{LOGS}/prepare_model.log",
        benchmark:
            f"{BENCH}/prepare_model.tsv"
        conda:
            CONDA_ENV
        script:
            str(SCRIPTS / "prepare_model.py")

else:

    rule prepare_model:
        output:
            directory(MODEL),
        params:
            stage=stage("prepare_model"),
        log:
            f"{LOGS}/prepare_model.log",
        benchmark:
            f"{BENCH}/prepare_model.tsv"
        conda:
            CONDA_ENV
        script:
            str(SCRIPTS / "prepare_model.py")

    rule prepare_data:
        input:
            model=MODEL,
        output:
            records=DATA["records"],
            corpus=DATA["corpus"],
            tasks=directory(DATA["tasks"]),
            summary=DATA["summary"],
        params:
            stage=stage("prepare_data"),
        log:
            f"{LOGS}/prepare_data.log",
        benchmark:
            f"{BENCH}/prepare_data.tsv"
        conda:
            CONDA_ENV
        script:
            str(SCRIPTS / "prepare_data.py")
