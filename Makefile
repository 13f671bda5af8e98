# The README's two commands: `make demo` and `make test`.
.PHONY: setup demo test test-fast lint bench

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/vmfork demo

test: setup
	.venv/bin/python -m pytest

test-fast: setup
	.venv/bin/python -m pytest tests/unit

lint: setup
	.venv/bin/ruff check src tests
	.venv/bin/mypy
	.venv/bin/python -m vmfork.api.openapi --check

bench: setup
	.venv/bin/python -m vmfork.bench
