.PHONY: help setup demo test lint unit integration natlab fuzz bench clean

help:
	@echo "make setup        install everything into .venv (and Debian tools, as root)"
	@echo "make demo         broker + bob + alice on localhost, bytes through a real forward"
	@echo "make test         the whole suite: lint, types, unit, integration, NAT lab"
	@echo "make unit | integration | natlab | lint"
	@echo "make fuzz         coverage-guided fuzzing of every decoder (atheris, 60 s)"
	@echo "make bench        benchmarks that print figures (see bench/README.md)"

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

fuzz:
	.venv/bin/python -c "import atheris" 2>/dev/null || .venv/bin/pip install -q atheris
	.venv/bin/python fuzz/fuzz_decoders.py -max_total_time=$${FUZZ_SECONDS:-60} build/fuzz-corpus

bench:
	.venv/bin/python bench/broker_bench.py

clean:
	rm -rf .venv build .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
