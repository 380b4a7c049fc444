PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the lowest supported versions (constraints-lowest.txt) live in their own environment
LOWEST := .venv-lowest
# what `make test-lowest` runs there: the tests marked `smoke` (export + reload in every library's own loader,
# the old layout, the card, the CLI end to end)
SMOKE ?= -m smoke

.PHONY: setup demo test test-lowest bench clean

setup: $(STAMP)

# the exact tested set: constraints.txt pins every package (pyproject.toml only declares ranges)
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/dgmr demo

test: setup
	$(BIN)/python -m pytest -q

# install the oldest versions pyproject.toml admits into .venv-lowest/ and run the smoke subset
test-lowest:
	test -x $(LOWEST)/bin/python || $(PY) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q -c constraints-lowest.txt -e '.[test]'
	$(LOWEST)/bin/python -m pytest -q -p no:cacheprovider $(SMOKE)

bench: setup
	$(BIN)/python benchmarks/selection.py

clean:
	rm -rf $(VENV) $(LOWEST) runs
