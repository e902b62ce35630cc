# Two commands: `make run` serves the app, `make test` runs the whole suite.
# Both bootstrap the same way: .venv, pinned requirements, the embedded models.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
export WORKBENCH_HOME ?= $(CURDIR)/workspace
# llama-cpp-python compiles from source (core/engine_build.py: for this CPU, minus AMX); use both cores.
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: run test soak bench lint format browser models bootstrap engine shots clean

run: bootstrap models
	$(PY) -m streamlit run workbench/app.py

test: bootstrap models browser
	bash tests/run_suite.sh

# The bounded soak test alone (make test runs it too): jobs, edits and SIGKILLs at once, then the counts.
soak: bootstrap models
	bash tests/run_suite.sh -m soak -s

# Every benchmark in tests/benchmarks, each printing workbench-vs-baseline ratios from one run, each in a
# process of its own (a benchmark's peak memory and loaded models must not weigh on the next). Their own
# pins first (TRL, the training benchmark's peer), held to the app's so torch and transformers never move.
bench: bootstrap models
	@$(PY) -m pip install -q --disable-pip-version-check -r tests/benchmarks/requirements.txt -c requirements.txt
	@status=0; for f in tests/benchmarks/bench_*.py; do \
	  name=$$(basename $$f .py); $(PY) -m tests.benchmarks $${name#bench_} || status=1; done; exit $$status

lint: bootstrap
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(PY) -m mypy

format: bootstrap
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

# The engine check runs every time (a no-op in well under a second when the installed engine was built
# for this CPU with these flags), so a .venv moved to another CPU is rebuilt instead of crashing.
bootstrap: $(STAMP)
	@$(PY) -m core.engine_build --venv $(VENV)

$(STAMP): requirements.txt pyproject.toml core/engine_build.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">> installing requirements into $(VENV) (first time: several minutes; llama-cpp-python compiles)"
	# torch first, pinned: nothing may pull a newer (CUDA) build.
	$(PY) -m pip install -q torch==2.13.0
	# The engine before the requirements, so that pip finds its pinned version installed and never
	# builds (or takes from its cache) a wheel with other flags.
	$(PY) -m core.engine_build --venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

# Rebuild llama-cpp-python for this CPU (without AMX kernels), whatever is installed or cached.
engine: $(STAMP)
	$(PY) -m core.engine_build --venv $(VENV) --rebuild

# Idempotent: assembles and converts only what is missing (about a minute, once).
models: bootstrap
	@$(PY) -m workbench prepare-models

# Debian's Chromium for the browser tests (Playwright's own browser download does not work here).
browser:
	@test -x /usr/bin/chromium || { echo ">> installing Debian's chromium"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# Refresh the README screenshots: every page in headless Chromium, against an app the test starts.
shots: bootstrap models browser
	WORKBENCH_SHOTS=$(CURDIR)/docs/screenshots $(PY) -m pytest tests/test_browser.py -q -p no:cacheprovider

clean:
	rm -rf $(VENV) workspace
