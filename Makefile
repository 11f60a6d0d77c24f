# make repro: set up .venv (from the pinned requirements) and run the DVC pipeline.
# make test:  set up the same way and run the test suite.
# make test-fast: the unit tests only (not the tests marked slow: dvc, pipelines, browser, bench).
# make bench-cells: the Dask overhead and speed-up on the default depth atlas (minutes).
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Offline here: use the shared copy of names.txt when it exists and nothing else is set.
NAMES_MIRROR ?= $(wildcard $(CURDIR)/../shared/data/names.txt)
export NAMES_MIRROR

.PHONY: repro test test-fast bench bench-cells sweep sweep-report lint clean-venv atlas-full

$(STAMP): requirements.txt
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

repro: $(STAMP)
	python -m pipeline.params params.yaml
	dvc repro
	@echo "report: $(CURDIR)/reports/report.html"
	@echo "depth atlas: $(CURDIR)/reports/atlas.html"

test: $(STAMP)
	python -m pytest

test-fast: $(STAMP)
	python -m pytest -m "not slow"

bench: $(STAMP)
	python -m benchmarks.bench
	@echo "(the atlas cells on Dask, embedded vs direct: make bench-cells)"

bench-cells: $(STAMP)
	python -m benchmarks.cells_bench

# Queue an 11-point gain sweep on DVC's experiment queue and run it with two single-threaded
# workers. With default params each point retrains kaiming (8 seeds x 200k steps): hours here.
# An explicit list, not range(0.5,3.01,0.25): Hydra's float range steps by the exact binary
# value of the step (0.3 gives 0.7999999999999999) and a reversed one starts at the stop
# (2.76, 2.51, ...), so a range can queue values nobody wrote.
GAINS := 0.5,0.75,1.0,1.25,1.5,1.75,2.0,2.25,2.5,2.75,3.0
sweep: $(STAMP)
	dvc exp run --queue -S 'variants.kaiming.gain=$(GAINS)'
	OMP_NUM_THREADS=1 dvc queue start -j 2
	dvc queue status
	@echo "running in the background: 'dvc queue status' to follow, then 'make sweep-report'"
	@echo "(the report says how many experiments are still queued or running, or failed)"

sweep-report: $(STAMP)
	python -m tools.sweep_report --out reports/sweep.html

lint: $(STAMP)
	ruff check .
	ruff format --check .

clean-venv:
	rm -rf $(VENV)

# The full depth atlas (docs/atlas.md): every depth 1..64 (powers of 2), widths 25..1,600,
# 9 gains of every nonlinearity with and without BatchNorm trained for 20,000 steps, 8
# seeds. Hundreds of CPU-hours: reports/atlas.html ("cost") gives the estimate from this
# machine's per-cell timings. Set CHARLM_SCHEDULER to send the cells to a Dask cluster
# (README, "The atlas on a cluster"). reporting/atlas.py FULL_ATLAS describes this grid.
atlas-full: $(STAMP)
	python -m pipeline.params params.yaml
	dvc exp run -n atlas-full \
	  -S 'atlas.depths=[1,2,4,8,16,32,64]' -S 'atlas.widths=[25,100,400,1600]' \
	  -S 'atlas.train.depths=[1,2,4,8,16,32,64]' \
	  -S 'atlas.train.nonlinearities=[tanh,relu,linear,sigmoid,gelu]' \
	  -S 'atlas.train.gain_factors=[0.5,0.6,0.75,0.9,1.0,1.25,1.5,2.0]' \
	  -S 'atlas.train.seeds=[0,1,2,3,4,5,6,7]' -S 'atlas.train.steps=20000'
	@echo "atlas: $(CURDIR)/reports/atlas.html"
