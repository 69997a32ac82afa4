# slimtune: `make run` from a fresh clone creates .venv, installs, runs the quickstart search.
#
#   make venv    create .venv and install slimtune (once; again only when pyproject.toml changes)
#   make test    lint and format check (ruff), then the test suite (the slow end-to-end tests included)
#   make lint    ruff check and ruff format --check (`ruff format .` fixes the format)
#   make run     search spaces/quickstart.yaml and print its Pareto front
#   make check   validate the quickstart space and pre-flight its methods (seconds)
#   make ui      MLflow UI on http://127.0.0.1:5000
#   make bench   per-trial overhead of `slimtune search` against a plain loop
#   make clean   remove search results and tracking stores (keeps .venv)
#   make lowest  the quick tests in .venv-lowest, every dependency at its declared lower bound

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
SPACE ?= spaces/quickstart.yaml
BENCH_ARGS ?= --trials 6

# pipefail: a failing pip is not masked by the grep that filters its output.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

# pip warns "Location ... is ignored: it is neither a file nor a directory" for every configured
# find-links folder that a machine lacks; drop those lines and keep everything else. The braces
# keep grep's "no line left" status (1) from failing the recipe while pip's status still counts.
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: venv test lint run check ui bench clean lowest

venv: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -q --upgrade pip $(QUIET_PIP)
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1 $(QUIET_PIP)
	$(VENV)/bin/pip install -q -e '.[test]' $(QUIET_PIP)
	touch $@

# Each two-node cluster test file runs in a pytest process of its own: a process that has already
# started and stopped local Ray instances does not get trials placed on every node of a new
# cluster, and Ray reads its auth mode (the cluster's token) once, when first imported.
TWO_NODE_TESTS := tests/clusters/test_multinode.py tests/clusters/test_user_code.py
test: venv lint
	$(VENV)/bin/python -m pytest -q $(addprefix --ignore=,$(TWO_NODE_TESTS))
	for file in $(TWO_NODE_TESTS); do $(VENV)/bin/python -m pytest -q $$file; done

# ruff: the linter (pyproject.toml's [tool.ruff.lint]) and the formatter, checked before the tests.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

run: venv
	$(VENV)/bin/slimtune search $(SPACE)

check: venv
	$(VENV)/bin/slimtune check $(SPACE)

ui: venv
	@echo "Open http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning (the search prints its experiment's URL)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

bench: venv
	$(VENV)/bin/python bench/overhead.py $(BENCH_ARGS)

# The lowest versions pyproject.toml declares (.ci/lowest_constraints.py pins each dependency to
# its `>=` bound; pip resolves the rest), in a venv of their own, then the quick tests that touch
# what the bounds are for: export and its program rewrites, the ONNX form, counting, every
# method's contract, the dependency checks, a 2-trial search of a user's files that exports
# and replays its trial, and the Pareto models logged in MLflow's pt2 format (test_registry: the
# search logs them but reports a failure rather than raising it) (LOWEST_TESTS=... runs others).
LOWEST := .venv-lowest
LOWEST_STAMP := $(LOWEST)/.installed
LOWEST_TESTS ?= tests/test_dependencies.py tests/deploy tests/methods/test_contract.py \
	tests/search/test_imports.py::test_a_search_of_user_files_exports_and_replays tests/search/test_registry.py
$(LOWEST)/bin/python:
	$(PYTHON) -m venv $(LOWEST)

$(LOWEST_STAMP): pyproject.toml .ci/lowest_constraints.py | $(LOWEST)/bin/python
	$(LOWEST)/bin/pip install -q --upgrade pip $(QUIET_PIP)
	$(LOWEST)/bin/python .ci/lowest_constraints.py > $(LOWEST)/constraints.txt
	$(LOWEST)/bin/pip install -q -c $(LOWEST)/constraints.txt -e '.[test]' $(QUIET_PIP)
	touch $@

lowest: $(LOWEST_STAMP)
	$(LOWEST)/bin/pip freeze --exclude-editable | grep -iEf <(sed 's/==.*//; s/^/^/; s/$$/==/' $(LOWEST)/constraints.txt)
	$(LOWEST)/bin/python -m pytest -q $(LOWEST_TESTS)

clean:
	rm -rf mlflow.db optuna.db slimtune_results exports mlruns mlartifacts
