# make demo   set up .venv (first time: a few minutes) and run a local 2-server swarm answering a prompt
# make test   set up .venv and run the whole test suite (what CI runs)
# make test-fast   the pure and in-process tests only (-m "not slow"), for development:
#                  8.5 min on 2 shared cores (2026-12-05, 506 tests); `make test` runs everything
.PHONY: setup demo test test-fast bench

setup:
	@bash scripts/setup_env.sh

demo: setup
	.venv/bin/swarm-node demo

test: setup
	.venv/bin/python -m pytest -q

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"

bench: setup
	.venv/bin/python scripts/bench_inference.py
