# probekit: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use (CPU torch 2.13.0, then the package with dev extras and the test peers).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-scaling bench-scaling-quick lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# the peers the tests and benchmarks compare against (nnsight, pyvene): without their own pins, so torch stays as pinned
	$(PY) -m pip install -q --no-deps nnsight==0.8.1 pyvene==0.1.8 greenlet==3.5.6 websocket-client==1.9.2 zstandard==0.25.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/probekit report --out reports/latest --overwrite

test: $(STAMP)
	$(PY) -m pytest -x

bench: $(STAMP)
	$(PY) benchmarks/run.py --out bench/bench.json

# time and memory curves of every instrument -> docs/performance.md, docs/figures/performance/ (~10 min, quiet machine)
bench-scaling: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/scaling.py

bench-scaling-quick: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/scaling.py --quick --out bench/scaling-quick

lint: $(STAMP)
	$(VENV)/bin/ruff check probekit tests analyses benchmarks notebooks

clean:
	rm -rf $(VENV) reports bench
