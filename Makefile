.PHONY: help setup demo test lint unit integration natlab fuzz bench bench-lab clean cmd lib test-c images examples example-python example-c example-cpp

help:
	@echo "make setup        install everything into .venv (and Debian tools, as root)"
	@echo "make demo         broker + bob + alice on localhost, bytes through a real forward"
	@echo "make test         the whole suite: lint, types, unit, integration, NAT lab"
	@echo "make unit | integration | natlab | lint"
	@echo "make images       container images (broker, agent, local Redis) without a registry"
	@echo "make cmd          build/install the natter command (.venv/bin/natter)"
	@echo "make lib          build/lib/libnatter.so and build/include/natter.h (C API)"
	@echo "make examples     run the Python, C and C++ examples (bytes through a real forward)"
	@echo "make test-c       the C API's error paths and threads, under AddressSanitizer"
	@echo "make fuzz         coverage-guided fuzzing of every decoder (atheris, 60 s)"
	@echo "make bench        broker and tunnel benchmarks that print figures (see bench/README.md)"
	@echo "make bench-lab    NAT-lab figures: the tunnel beside its anchors, path matrix, relay, loss (root)"

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
	.venv/bin/python bench/tunnel_bench.py

# the NAT-lab figures (root: network namespaces)
bench-lab:
	.venv/bin/python bench/lab_bench.py
	.venv/bin/python bench/nat_matrix.py
	.venv/bin/python bench/relay_bench.py
	.venv/bin/python bench/loss_bench.py

CFLAGS_EX = -Wall -Werror -O1 -Ibuild/include
LDFLAGS_EX = -Lbuild/lib -lnatter -lpthread -Wl,-rpath,$(CURDIR)/build/lib
SANITIZE = -fsanitize=address,undefined -fno-omit-frame-pointer -g

images:
	./scripts/images.sh

cmd:
	./scripts/setup.sh

lib:
	.venv/bin/python lib/build_libnatter.py

example-python:
	.venv/bin/python examples/python/simple.py

example-c: lib
	gcc $(CFLAGS_EX) examples/c/simple.c $(LDFLAGS_EX) -o build/simple_c
	./build/simple_c

example-cpp: lib
	g++ -std=c++17 $(CFLAGS_EX) examples/cpp/simple.cpp $(LDFLAGS_EX) -o build/simple_cpp
	./build/simple_cpp

examples: example-python example-c example-cpp

test-c:
	NATTER_SANITIZE=1 .venv/bin/python lib/build_libnatter.py
	gcc -Wall -Werror $(SANITIZE) -Ibuild/include tests/c/test_errors.c \
		-Lbuild/asan/lib -lnatter -lpthread -Wl,-rpath,$(CURDIR)/build/asan/lib -o build/test_errors
	ASAN_OPTIONS=detect_leaks=0 ./build/test_errors

clean:
	rm -rf .venv build .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
