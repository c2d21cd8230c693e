# Downstream evaluation: lm-eval on the base model plus each edit state an editing job saved.
# Its own jobs, so adding a task or changing downstream settings reruns these and no edit.
# Each job writes the configured tasks' rows (<table>.csv) and the leaf tasks of groups such as mmlu
# and bbh (<table>_subtasks.csv). A task that fails is a row with its `error` and the job still
# succeeds (editlib.study.pipeline, "A downstream job whose tasks partly failed"). The unedited
# model's per-item values (base_items.csv) pair every edited state's rows with it question by
# question (their `change_stderr`).


rule downstream_base:
    input:
        model=MODEL,
        tasks=DATA["tasks"],
    output:
        table=f"{OUT}/downstream/base.csv",
        subtasks=f"{OUT}/downstream/base_subtasks.csv",
        item_values=f"{OUT}/downstream/base_items.csv",
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
        base_subtasks=f"{OUT}/downstream/base_subtasks.csv",
        base_items=f"{OUT}/downstream/base_items.csv",
    output:
        table=f"{OUT}/downstream/sequential/{{method}}/b{{batch_size}}-s{{sample}}.csv",
        subtasks=f"{OUT}/downstream/sequential/{{method}}/b{{batch_size}}-s{{sample}}_subtasks.csv",
    params:
        stage=stage("downstream_sequential"),
        experiment="sequential",
        # not an output: Snakemake deletes the outputs of failed jobs, the evaluated states' rows must
        # survive for a rerun (removed once the tables are written)
        partials=f"{OUT}/checkpoints/downstream/sequential/{{method}}/b{{batch_size}}-s{{sample}}",
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
        base_subtasks=f"{OUT}/downstream/base_subtasks.csv",
        base_items=f"{OUT}/downstream/base_items.csv",
    output:
        table=f"{OUT}/downstream/batched/{{method}}.csv",
        subtasks=f"{OUT}/downstream/batched/{{method}}_subtasks.csv",
    params:
        stage=stage("downstream_batched"),
        experiment="batched",
        # not an output: Snakemake deletes the outputs of failed jobs, the evaluated states' rows must
        # survive for a rerun (removed once the tables are written)
        partials=f"{OUT}/checkpoints/downstream/batched/{{method}}",
    threads: config["threads"]
    log:
        f"{LOGS}/downstream/batched/{{method}}.log",
    benchmark:
        f"{BENCH}/downstream/batched/{{method}}.tsv"
    conda:
        CONDA_ENV
    script:
        str(SCRIPTS / "downstream.py")
