# Editing experiments. Each job's params are the part of the config it reads (stage_config): a
# method's block and its experiment's settings, so changing one method's hyperparameters reruns
# only that method's jobs (and the tables and figures built from them).

rule layer_sweep:
    input:
        model=MODEL,
        moments=MOMENTS,
        records=DATA["records"],
    output:
        f"{OUT}/layer_sweep/{{method}}.csv",
    params:
        stage=stage("layer_sweep"),
    threads: config["threads"]
    log:
        f"{LOGS}/layer_sweep/{{method}}.log",
    benchmark:
        f"{BENCH}/layer_sweep/{{method}}.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "layer_sweep.py")


rule sensitivity:
    input:
        model=MODEL,
        moments=MOMENTS,
        records=DATA["records"],
        sweep=sweep_input,
    output:
        f"{OUT}/sensitivity/{{method}}.csv",
    params:
        stage=stage("sensitivity"),
    threads: config["threads"]
    log:
        f"{LOGS}/sensitivity/{{method}}.log",
    benchmark:
        f"{BENCH}/sensitivity/{{method}}.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "sensitivity.py")


rule train_mend:
    input:
        model=MODEL,
        records=DATA["records"],
    output:
        MEND_EDITOR,
    params:
        stage=stage("train_mend") if trained_editor_block(config) else {},
    threads: config["threads"]
    log:
        f"{LOGS}/train_mend.log",
    benchmark:
        f"{BENCH}/train_mend.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "train_mend.py")


rule single_edits:
    input:
        model=MODEL,
        moments=moments_input,
        records=DATA["records"],
        sweep=sweep_input,
        mend=mend_input,
    output:
        f"{OUT}/single/{{method}}.csv",
    params:
        stage=stage("single"),
    threads: config["threads"]
    log:
        f"{LOGS}/single/{{method}}.log",
    benchmark:
        f"{BENCH}/single/{{method}}.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "single_edits.py")


rule batched_edits:
    input:
        model=MODEL,
        moments=moments_input,
        records=DATA["records"],
        sweep=sweep_input,
        mend=mend_input,
    output:
        results=f"{OUT}/batched/{{method}}.csv",
        states=state_output(f"{STATES}/batched/{{method}}"),
    params:
        stage=stage("batched"),
    threads: config["threads"]
    priority: 10  # the longest jobs: start them first so that short ones fill the end
    log:
        f"{LOGS}/batched/{{method}}.log",
    benchmark:
        f"{BENCH}/batched/{{method}}.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "batched_edits.py")


rule sequential_edits:
    input:
        model=MODEL,
        moments=moments_input,
        records=DATA["records"],
        sweep=sweep_input,
        mend=mend_input,
        # the probe texts (experiments.sequential.probe), when configured
        corpus=DATA["corpus"] if EXPERIMENTS["sequential"].get("probe") else [],
    output:
        results=f"{OUT}/sequential/{{method}}/b{{batch_size}}-s{{sample}}.csv",
        steps=f"{OUT}/sequential/{{method}}/b{{batch_size}}-s{{sample}}_steps.csv",
        states=state_output(f"{STATES}/sequential/{{method}}/b{{batch_size}}-s{{sample}}"),
    params:
        stage=stage("sequential"),
        # not an output: Snakemake deletes the outputs of failed jobs, the checkpoint must survive
        checkpoint=f"{OUT}/checkpoints/sequential/{{method}}/b{{batch_size}}-s{{sample}}.safetensors",
    threads: config["threads"]
    log:
        f"{LOGS}/sequential/{{method}}/b{{batch_size}}-s{{sample}}.log",
    benchmark:
        f"{BENCH}/sequential/{{method}}/b{{batch_size}}-s{{sample}}.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "sequential_edits.py")
