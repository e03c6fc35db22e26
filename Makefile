# The README's two commands are `make demo` and `make test`. Both build .venv on first use and
# reuse it afterwards: the stamp file is only rebuilt when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TOY := toy_data

.PHONY: demo test bench clean mutants

$(STAMP): pyproject.toml setup.py data/_jpeg.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(TOY)/.done: tools/make_toy_data.py $(STAMP)
	$(PY) tools/make_toy_data.py --out $(TOY) --seed 0
	touch $@

demo: $(STAMP) $(TOY)/.done
	$(PY) tools/demo.py --data $(TOY) --out runs/demo

# One pytest worker per core (at most 4), a test file per worker, one thread each: the suite's toy runs
# are too small for two threads, and a worker's second thread only contends with the other worker.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile tests

# Random one-token mutants of engine/ and data/, judged by the unit tests that run the mutated line
# (docs/mutants.md). A habit, not CI: about 5-10 minutes for 40 mutants on 2 cores.
SEED ?= 2801
N ?= 40
mutants: $(STAMP)
	nice -n 10 $(PY) tools/mutants.py --seed $(SEED) -n $(N) $(MODULES)

bench: $(STAMP) $(TOY)/.done
	$(PY) bench/latency.py
	$(PY) bench/train_throughput.py
	$(PY) bench/data_throughput.py
	$(PY) bench/shards.py --data $(TOY)
	$(PY) bench/average_memory.py
	$(PY) bench/accumulation.py
	$(PY) bench/segmentation.py --data $(TOY)
	$(PY) bench/detection.py
	$(PY) bench/qat_latency.py --threads 1

clean:
	rm -rf runs $(TOY) photo_data
