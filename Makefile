# make demo   set up .venv (first time: a few minutes) and run a local 2-server swarm answering a prompt
# make test   set up .venv and run the whole test suite (what CI runs)
.PHONY: setup demo test bench

setup:
	@bash scripts/setup_env.sh

demo: setup
	.venv/bin/swarm-node demo

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python scripts/bench_inference.py
