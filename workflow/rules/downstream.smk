# Downstream evaluation: lm-eval on the base model plus each edit state an editing job saved.
# Its own jobs, so adding a task or changing downstream settings reruns these and no edit.


rule downstream_base:
    input:
        model=MODEL,
        tasks=DATA["tasks"],
    output:
        f"{OUT}/downstream/base.csv",
    params:
        stage=stage("downstream_base"),
    threads: config["threads"]
    log:
        f"{LOGS}/downstream/base.log",
    benchmark:
        f"{BENCH}/downstream/base.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "downstream.py")


rule downstream_sequential:
    input:
        model=MODEL,
        moments=moments_input,
        mend=mend_input,
        tasks=DATA["tasks"],
        states=f"{STATES}/sequential/{{method}}/b{{batch_size}}-s{{sample}}",
        base=f"{OUT}/downstream/base.csv",
    output:
        f"{OUT}/downstream/sequential/{{method}}/b{{batch_size}}-s{{sample}}.csv",
    params:
        stage=stage("downstream_sequential"),
        experiment="sequential",
    threads: config["threads"]
    log:
        f"{LOGS}/downstream/sequential/{{method}}/b{{batch_size}}-s{{sample}}.log",
    benchmark:
        f"{BENCH}/downstream/sequential/{{method}}/b{{batch_size}}-s{{sample}}.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "downstream.py")


rule downstream_batched:
    input:
        model=MODEL,
        moments=moments_input,
        mend=mend_input,
        tasks=DATA["tasks"],
        states=f"{STATES}/batched/{{method}}",
        base=f"{OUT}/downstream/base.csv",
    output:
        f"{OUT}/downstream/batched/{{method}}.csv",
    params:
        stage=stage("downstream_batched"),
        experiment="batched",
    threads: config["threads"]
    log:
        f"{LOGS}/downstream/batched/{{method}}.log",
    benchmark:
        f"{BENCH}/downstream/batched/{{method}}.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "downstream.py")
