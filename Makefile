# Two commands for a fresh machine with Python 3.11+ and pip (the README's quickstart):
#   make demo   # runs `skillgraft demo` on the shipped micro-world
#   make test   # runs the test suite (pytest)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/.skillgraft-installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "skillgraft needs Python 3.11+")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch; an unpinned torch would pull gigabytes of CUDA wheels
	$(BIN)/python -m pip install -q torch==2.13.0
	# '.[test]': every extra (sweep, ray), pytest, and the reference tools the tests compare against
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.skillgraft-installed

demo: install
	$(BIN)/skillgraft demo

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) demo .pytest_cache
