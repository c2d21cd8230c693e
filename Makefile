# Two commands on a fresh machine: `make reproduce` (the embedded default, end to end) and
# `make test`. Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config.yaml
CORES ?= all
# Extra pip arguments, e.g. PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for a CPU torch.
PIP_ARGS ?=
RUN := $(shell sed -n 's/^run: *\([A-Za-z0-9_.-]*\).*/\1/p' $(CONFIG))
# The SLURM profile `make plan` checks the jobs against
PROFILE ?= workflow/profiles/slurm
# TRAIN_MODEL=1: train the toy model in the pipeline even where the config's model.pinned (the model
# shipped in models/) matches its recipe and world (configs/overlays/train-model.yaml over CONFIG)
TRAIN_MODEL ?=
CONFIGFILES := $(CONFIG) $(if $(filter-out 0,$(TRAIN_MODEL)),configs/overlays/train-model.yaml)
SNAKEMAKE := $(BIN)/snakemake --configfile $(CONFIGFILES) --profile workflow/profiles/default --cores $(CORES)

.PHONY: install reproduce report dry-run plan rehearse test test-all bench clean-results

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_ARGS) torch==2.13.0
	$(BIN)/python -m pip install $(PIP_ARGS) -e '.[dev]'
	touch $@

reproduce: install
	$(SNAKEMAKE)
	$(MAKE) report CONFIG=$(CONFIG) TRAIN_MODEL=$(TRAIN_MODEL)

report: install
	mkdir -p reports/$(RUN)
	$(BIN)/snakemake --configfile $(CONFIGFILES) --report reports/$(RUN)/report.html

dry-run: install
	$(SNAKEMAKE) -n

# Every job of CONFIG with its estimated GPU memory, host memory, disk and time on an H100, the
# run's GPU-hours, and whether each job fits PROFILE's requests (editlib/study/plan.py)
plan: install
	$(BIN)/python -m editlib.study.plan --config $(CONFIG) --profile $(PROFILE)

# A paper config's whole workflow on CPU against local stand-ins for the hub, the record files and
# the lm-eval tasks' data, at the sizes of configs/rehearsal/<name>.yaml (editlib/study/rehearsal/run.py):
# make rehearse CONFIG=configs/llama3-8b.yaml. Results under .rehearsal/<name>/.
rehearse: install
	$(BIN)/python -m editlib.study.rehearsal $(CONFIG) --cores $(CORES)

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ''

# The standing speed benchmarks, editlib against the reference implementations' way or the
# alternative it chose against, as ratios (about 10 minutes on 2 cores; bench/run.py): writes
# bench/results.csv, bench/results.md and the table in docs/performance.md. Those on SmolLM2 skip
# unless configs/smollm2.yaml's model and records are prepared.
bench: install
	$(BIN)/python bench/run.py

clean-results:
	rm -rf results/$(RUN) reports/$(RUN) logs/$(RUN) benchmarks/$(RUN)
