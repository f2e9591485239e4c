# make demo   set up .venv (first time: a few minutes) and run a local 2-server swarm answering a prompt
# make test   set up .venv and run the whole test suite (what CI runs)
# make lint   ruff check, ruff format --check and the layer rules (scripts/check_layers.py; CI runs it too)
# make test-fast   the pure and in-process tests only (-m "not slow"), for development:
#                  4.9 min on 2 cores (2026-12-05, 587 tests; 8.5 min before peers closed their
#                  connections on leaving); `make test` runs everything
.PHONY: setup setup-test demo test test-fast lint bench

setup:
	@bash scripts/setup_env.sh

setup-test:  # the same, and headless Chromium for the browser tests is a must
	@SWARM_BROWSER_REQUIRED=1 bash scripts/setup_env.sh

demo: setup
	.venv/bin/swarm-node demo

test: setup-test
	.venv/bin/python -m pytest -q

test-fast: setup-test
	.venv/bin/python -m pytest -q -m "not slow"

lint: setup
	.venv/bin/ruff check swarm_node tests scripts
	.venv/bin/ruff format --check swarm_node tests scripts
	.venv/bin/python scripts/check_layers.py

bench: setup
	.venv/bin/python scripts/bench_inference.py
