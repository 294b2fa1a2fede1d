# latent-atlas: two commands on a fresh machine.
#   make run    set up .venv and run the default pipeline (embedded SmolLM2 on the shipped corpus)
#   make test   set up .venv and run the tests (unit + the real DAG on config/ci.yaml)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
# torch goes in first, pinned, so that pip never resolves a bare `torch` to a multi-GB CUDA build.
# On a GPU workstation, set TORCH_SPEC to the build you want (or install torch yourself first).
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= config/config.yaml
# GPU rules declare `resources: gpu=1`; the default profile allows one at a time (one GPU). Where nvidia-smi
# sees no GPU that cap would only serialise CPU jobs (two one-thread family members could not run side by
# side), so it is lifted; with GPUs it is their number.
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
GPU_CAP := --resources gpu=$(if $(filter 0,$(GPUS)),1000,$(GPUS))

.PHONY: install run test test-slurm lint report dry-run benchmark findings study clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,reports]"
	touch $@

# `latent-atlas config` first: Snakemake's own message for a YAML error names no file or line.
run: install
	$(BIN)/latent-atlas config $(CONFIG)
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG) $(GPU_CAP)

dry-run: install
	$(BIN)/latent-atlas config $(CONFIG)
	$(BIN)/snakemake --dry-run --configfile $(CONFIG)

report: install
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG) $(GPU_CAP) --report report.html

test: install
	$(BIN)/python -m pytest -m "not slurm"

# The real-SLURM test: as root, installs Debian's slurm packages, starts a one-node cluster with a fake GPU,
# runs part of the DAG through it and stops every daemon (skips with its reason where it cannot).
test-slurm: install
	$(BIN)/python -m pip install --quiet -e ".[slurm]"
	$(BIN)/python -m pytest -m slurm tests/integration/test_slurm.py

lint: install
	$(BIN)/ruff check src scripts tests benchmarks
	$(BIN)/ruff format --check src scripts tests benchmarks
	$(BIN)/snakefmt --check workflow/Snakefile rules/
	$(BIN)/snakemake --lint --configfile $(CONFIG)

# The CPU study (config/study.yaml: about 2 hours on 2 cores), then its claims copied to docs/study/claims/ and
# the README's findings section regenerated from them.
study: install
	$(BIN)/snakemake --cores $(CORES) --configfile config/study.yaml $(GPU_CAP)
	mkdir -p docs/study/claims && cp results/claims/*.parquet docs/study/claims/
	$(MAKE) findings

findings: install
	$(BIN)/latent-atlas findings $(sort $(wildcard docs/study/claims/*.parquet)) --write README.md --full docs/findings.md

# Every benchmark in its own process (each prints its tables: medians and range over interleaved rounds).
# Those reading results/ need `make run` first; readers.py falls back to a tiny random model without it.
# faiss-cpu (the `bench` extra) is the exact-kNN reference; knn.py skips its rows with a line without it.
benchmark: install
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/extraction.py
	$(BIN)/python benchmarks/lenses.py --tokens 256 --rounds 3
	$(BIN)/python benchmarks/knn.py --queries 1 64 512 4096 --rounds 5
	$(BIN)/python benchmarks/steering.py --rounds 3 --tokens 8
	$(BIN)/python benchmarks/geometry.py --synthetic 300000 --threads 1
	$(BIN)/python benchmarks/training.py
	$(BIN)/python benchmarks/readers.py
	$(BIN)/python benchmarks/probe.py --model results/models/smollm2-135m --texts 4 --layer 12

clean:
	rm -rf results .snakemake report.html
