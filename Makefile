# make demo: set everything up and run the main job on built-in defaults.
# make test: set everything up and run the tests (two processes, a test file's tests in one: its fixtures built once).
# Both are idempotent: the virtual environment is rebuilt only when pyproject.toml or
# constraints.txt change.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

setup: $(STAMP)

demo: setup
	$(VENV)/bin/vidu demo

test: setup
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=15

clean:
	rm -rf $(VENV) vidu-work .pytest_cache
