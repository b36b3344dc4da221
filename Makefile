# winnow: `make demo` and `make test` each work alone on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU machines: a local file of this torch exists; any other version pulls GBs of CUDA wheels.
TORCH  ?= torch==2.13.0
EXTRAS ?= cpu,dev,ray,embed
PIP    := $(BIN)/python -m pip --quiet --quiet --disable-pip-version-check

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint bench-cpu clean server

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e ".[$(EXTRAS)]"
	touch $(STAMP)

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
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q tests $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs data/demo .pytest_cache
