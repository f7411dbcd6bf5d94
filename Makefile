.PHONY: help setup demo test lint unit integration natlab clean

help:
	@echo "make setup        install everything into .venv (and Debian tools, as root)"
	@echo "make demo         broker + bob + alice on localhost, bytes through a real forward"
	@echo "make test         the whole suite: lint, types, unit, integration, NAT lab"
	@echo "make unit | integration | natlab | lint"

setup:
	./scripts/setup.sh

demo:
	./scripts/demo.sh

test:
	./scripts/test.sh

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

unit:
	.venv/bin/pytest -q tests/unit

integration:
	.venv/bin/pytest -q tests/integration

natlab:
	.venv/bin/pytest -q tests/integration/test_natlab.py

clean:
	rm -rf .venv build .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
