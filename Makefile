# The two set-up commands: `make search` (the main job on the embedded default) and `make test`.
# Each creates and fills .venv on first use; later runs reuse it. PYTHON picks the interpreter (3.11 to 3.13).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hamtune-installed

.PHONY: search test bench bench-payoff bench-determinism install check-python smoke-second-python clean

check-python:
	@command -v $(PYTHON) >/dev/null 2>&1 && $(PYTHON) -c 'import sys' 2>/dev/null || \
	  { echo "hamtune needs Python 3.11, 3.12 or 3.13: '$(PYTHON)' does not run here (try make PYTHON=python3.12 ...)" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; ok = (3, 11) <= v <= (3, 13); \
	ok or print(f"hamtune needs Python 3.11, 3.12 or 3.13; $(PYTHON) is {sys.version.split()[0]} (try make PYTHON=python3.12 ...)", file=sys.stderr); \
	sys.exit(0 if ok else 1)'

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory check-python PYTHON=$(PYTHON)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,cluster,pretrained]'
	touch $(STAMP)

install: $(STAMP)

search: $(STAMP)
	$(BIN)/hamtune search --space search_spaces/default.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	bash bench/run_all

# CI's second-Python check: install into a separate venv on another interpreter and run the smoke test there.
SECOND_PYTHON ?= python3.12
SECOND_VENV ?= .venv-second
smoke-second-python:
	@$(MAKE) --no-print-directory check-python PYTHON=$(SECOND_PYTHON)
	test -x $(SECOND_VENV)/bin/python || $(SECOND_PYTHON) -m venv $(SECOND_VENV)
	$(SECOND_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SECOND_VENV)/bin/python -m pip install --quiet -e .
	cd $$(mktemp -d) && $(CURDIR)/$(SECOND_VENV)/bin/hamtune search --smoke-test --space $(CURDIR)/search_spaces/default.yaml

# The search-payoff study on real HAM10000 (../shared/data/ham10000-200x150): about 110 minutes on 2 cores from
# scratch. The data is prepared once, the grid's curves are recorded (training seeds 0 and 1) in two processes of one
# thread each, then the searches are replayed over both recordings (both stages resume from bench/out/payoff/ when
# cut short). The replay alone, over the committed bench/search_payoff_curves.json: `--stage replay`.
bench-payoff: $(STAMP)
	$(BIN)/python bench/search_payoff.py --stage record --max-configs 0
	$(BIN)/python bench/search_payoff.py --stage record --shard 0/2 & \
	  $(BIN)/python bench/search_payoff.py --stage record --shard 1/2; wait
	$(BIN)/python bench/search_payoff.py --stage replay

# Same seed, same search: search_spaces/default.yaml alone and beside a heavy job (about 8 minutes).
bench-determinism: $(STAMP)
	$(BIN)/python bench/bench_determinism.py

clean:
	rm -rf $(VENV) $(SECOND_VENV) .pytest_cache build *.egg-info
