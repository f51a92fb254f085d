# The two commands: `make demo` and `make test`. Each builds .venv from nothing when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the pinned torch first: on a CUDA box this pin is a CUDA build, here the CPU wheel on disk
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m daemon.demo

# Two pytest workers (pytest-xdist): much of the suite waits on daemons, subprocesses and polls,
# so two at a time fill 2 cores better than one (on 2 cores: ~820 -> ~560 s). `make test
# TEST_WORKERS=0` runs it serially, TEST_WORKERS=auto one per core.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q --durations=25 -n $(TEST_WORKERS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs queue.db queue.db-wal queue.db-shm
