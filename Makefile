# One entry point for everything a user runs. Each target creates the environment first if needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo.yaml
ARGS ?=

CONFIG_FLAGS := $(foreach c,$(CONFIG),--config $(c))

ifdef RAY_ADDRESS
# On a cluster (RAY_ADDRESS = its dashboard URL, e.g. http://head:8265) each stage is a Ray job:
# the repo is uploaded as its working dir (relative CONFIG paths resolve inside it), logs
# stream back, and make fails unless the job succeeded (stages/submit.py).
# Token auth is the cluster's business: RAY_AUTH_MODE/RAY_AUTH_TOKEN come from your shell.
STAGE := $(PY) -m stages.submit
else
# Local runs: no Ray token auth, no usage stats.
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
STAGE := $(PY) -m stages
endif

.PHONY: setup demo shard teacher-cache distill export evaluate verify list test test-fast bench docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e '.[test]'
	touch $@

demo shard teacher-cache distill export evaluate verify list: setup
	$(STAGE) $@ $(CONFIG_FLAGS) $(ARGS)

# Tests and benchmarks start their own local Ray, whatever RAY_ADDRESS says.
# test: TEST_WORKERS pytest processes (xdist), each test file in one of them so that its module
# fixtures are built once, taken in the order tests/conftest.py gives (longest first); much of
# a Ray test is waiting for processes to start, so two share two cores well.
# test-fast: the inner loop, only the tests that need neither Ray nor the S3 server (markers in pyproject.toml).
TEST_WORKERS ?= 2
test: setup
	env -u RAY_ADDRESS $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS)

test-fast: setup
	env -u RAY_ADDRESS $(PY) -m pytest -m "not slow and not s3" $(ARGS)

bench: setup
	env -u RAY_ADDRESS $(PY) -m bench.run $(ARGS)

# docs/configuration.md is generated from the config's field descriptions; tests/test_docs.py fails when it is stale.
docs: setup
	$(PY) -m stages.config_reference

clean:
	rm -rf runs bench/work
