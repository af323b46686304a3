# One entry point for everything a user runs. Each target creates the environment first if needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo.yaml
ARGS ?=
# Local runs: no Ray token auth, no usage stats (a cluster sets its own, see cluster/).
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

CONFIG_FLAGS := $(foreach c,$(CONFIG),--config $(c))

.PHONY: setup demo shard teacher-cache distill export evaluate verify list test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e '.[test]'
	touch $@

demo: setup
	$(PY) -m stages demo $(CONFIG_FLAGS) $(ARGS)

shard teacher-cache distill export evaluate verify list: setup
	$(PY) -m stages $@ $(CONFIG_FLAGS) $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

bench: setup
	$(PY) -m bench.run $(ARGS)

clean:
	rm -rf runs bench/work
