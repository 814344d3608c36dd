# Every target sets itself up: a .venv in the repository with the package installed editable.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CPU build of torch that lies on these machines' disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The Triton release of the GPU machines, so the interpreter tests and AOT compiles match what runs there.
TRITON_SPEC ?= triton==3.6.0
# Triton 3.6's interpreter calls int() on 1-element arrays, which numpy 2.4 refuses.
NUMPY_SPEC ?= numpy<2.4
STAMP := $(VENV)/.kdfast-installed

.PHONY: setup test bench lint build clean

setup: $(STAMP)

# torch through pip, which finds the local CPU build (uv does not look for it); the rest through uv: 8 s from an empty
# cache where pip took 55 s from a warm one (a 2-core AMD EPYC, 2026-12-07); pip where uv cannot (an index it cannot
# reach, say).
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	( $(PY) -m pip install --quiet uv && $(VENV)/bin/uv pip install --quiet --python $(PY) \
	    -e ".[dev]" "$(TRITON_SPEC)" "$(NUMPY_SPEC)" ) \
	  || $(PY) -m pip install --quiet -e ".[dev]" "$(TRITON_SPEC)" "$(NUMPY_SPEC)"
	touch $(STAMP)

# Two workers on CI's 2 cores: the suite is mostly single-threaded interpreter and subprocess work (pytest took
# 14.0 min against 22.7 serial on such a machine). Whole files per worker, so a module's fixture (the nvcc
# compiles, the ranks' setups) runs once; the longest files first (tests/file_order.py), not xdist's reorder.
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

bench: setup
	# Huge pages for big CPU tensors (a torch setting): fresh [N, V] buffers otherwise cost 100+ ms of page faults.
	# Short shapes, a few minutes; `make bench BENCH_ARGS=--full` runs the long shapes and every contender.
	THP_MEM_ALLOC_ENABLE=1 $(VENV)/bin/kdfast bench $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

build: setup
	$(VENV)/bin/kdfast build

clean:
	rm -rf $(VENV) build *.egg-info
