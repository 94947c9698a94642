# The two set-up commands: `make search` (the main job on the embedded default) and `make test`.
# Each creates and fills .venv on first use; later runs reuse it.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hamtune-installed
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: search test bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,cluster]'
	touch $(STAMP)

install: $(STAMP)

search: $(STAMP)
	$(BIN)/hamtune search --space search_spaces/default.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	bash bench/run_all

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
