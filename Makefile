# winnow: `make demo` and `make test` each work alone on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
# Installs come from the committed lock, exactly; `make lock` writes it (see README, "Dependencies").
LOCK   := requirements/cpu.lock.txt
# CPU machines: the CPU build of torch lies here; any other torch pulls GBs of CUDA wheels.
LOCAL_WHEELS ?= /opt/wheels
UV_VERSION := $(shell sed -n 's/^uv==\([^ ]*\).*/\1/p' $(LOCK))
UV      = $(BIN)/uv
QUIET  := --quiet --disable-pip-version-check

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-faults test-latest lock check-lock lint format typecheck bench-smoke ci clean server

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(BIN)/python -m pip install $(QUIET) "uv==$(UV_VERSION)"
	$(UV) pip sync --quiet --compile-bytecode --python $(BIN)/python --require-hashes --find-links $(LOCAL_WHEELS) $(LOCK)
	$(UV) pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

# Rewrite requirements/*.lock.txt from pyproject.toml, keeping every locked version that still fits;
# `make lock UPGRADE=1` takes the newest versions pyproject allows. Commit the lock on its own, after
# `make test` passed on it.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(BIN)/python -m pip install $(QUIET) "uv==$(UV_VERSION)"
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python requirements/lock.py $(if $(UPGRADE),--upgrade)

check-lock: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python requirements/lock.py --check

# The main job on the built-in demo corpus, on CPU: corpus -> proxy training -> EL2N -> prune -> shards + report.
demo: $(STAMP)
	$(BIN)/winnow demo-data data/demo
	$(BIN)/winnow run configs/demo.yaml
	$(BIN)/winnow inspect runs/demo

# A Prefect server on loopback for `winnow serve`; its database lives in ./.prefect, so stopping it
# (Ctrl-C) and starting it again keeps deployments, schedules and run history.
# Then: export PREFECT_API_URL=http://127.0.0.1:4200/api
server: $(STAMP)
	PREFECT_HOME=$(CURDIR)/.prefect $(BIN)/prefect server start --host 127.0.0.1 --port 4200

# Two workers by default (CI has 2 cores; many tests wait on Prefect servers and subprocesses); each
# worker takes whole test files, so module fixtures are built once. TEST_WORKERS=0 runs in one process.
# pytest-randomly shuffles files and tests on every run: the command printed names the seed, and
# `make test TEST_SEED=N` repeats that order (PYTEST_ARGS="-p no:randomly" keeps the file order).
TEST_WORKERS ?= 2
TEST_SEED ?= $(shell $(PYTHON) -c 'import random; print(random.randrange(1, 2**31))')
PYTEST_ARGS ?=
PYTEST = -m pytest -q tests $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) \
         -p randomly --randomly-seed=$(TEST_SEED) $(PYTEST_ARGS)
test: $(STAMP)
	$(BIN)/python $(PYTEST)

# The drift lane: the newest versions pyproject allows (torch stays the local CPU build), in .venv-latest,
# then the suite. It finds on purpose what a new user would otherwise find on a fresh machine.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install $(QUIET) "uv==$(UV_VERSION)"
	$(LATEST)/bin/uv pip install --quiet --python $(LATEST)/bin/python --upgrade --find-links $(LOCAL_WHEELS) \
	  -c requirements/cpu-platform.txt -e ".[cpu,dev,ray,embed]"
	$(LATEST)/bin/uv pip freeze --python $(LATEST)/bin/python --exclude-editable > $(LATEST)/versions.txt
	@echo "versions that differ from $(LOCK):"
	@$(LATEST)/bin/python requirements/lock.py --diff $(LOCK) $(LATEST)/versions.txt
	$(LATEST)/bin/python $(PYTEST)

# The whole fault test: 20 SIGKILLs at random moments (each then rerun) and 10 races on one folder
# (make test runs the first of each, to keep CI within its 15 minutes).
test-faults: $(STAMP)
	WINNOW_FAULT_KILLS=20 WINNOW_FAULT_RACES=10 $(BIN)/python -m pytest -q tests/test_faults.py -p no:randomly

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The type check of the compute layer (winnow/grads, scorers, selectors; pyproject's [tool.mypy]).
typecheck: $(STAMP)
	$(BIN)/mypy

# Every benchmark in its --smoke mode (tiny shapes, CPU): none of them rots.
bench-smoke: $(STAMP)
	$(BIN)/python benchmarks/smoke.py

# What CI runs (.ci/run).
ci: check-lock lint typecheck test bench-smoke

clean:
	rm -rf runs data/demo .pytest_cache
