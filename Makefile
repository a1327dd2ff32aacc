# The project's checks; `make test` is the test command README.md names and CI runs.
PY ?= .venv/bin/python
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0
export RAY_USAGE_STATS_ENABLED = 0

.PHONY: test lint typecheck layers unit
test: lint typecheck layers unit

lint:
	$(PY) -m ruff check service operators tests bench examples

typecheck:
	$(PY) -m mypy service/optimenv operators/optimenv_controller

layers:
	.venv/bin/lint-imports

unit:
	$(PY) -m pytest -q -p no:cacheprovider
