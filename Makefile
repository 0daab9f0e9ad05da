# The two commands of the README, and what they are made of.
.PHONY: quickstart test lint env env-dev bench

VENV := .venv/bin

quickstart: env
	$(VENV)/tuneloom models prepare smollm2-135m-instruct
	$(VENV)/tuneloom validate-data examples/support-tickets/train.jsonl --model $$($(VENV)/tuneloom models prepare smollm2-135m-instruct) --max-seq-length 512 --batch-size 4 --epochs 3
	$(VENV)/tuneloom train -f examples/quickstart.yaml --fresh
	$(VENV)/python -I examples/support-tickets/ask_over_http.py --store out/store

test: env-dev
	$(VENV)/ruff check .
	$(VENV)/pytest

lint: env-dev
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

env:
	scripts/bootstrap.sh train,models,serve-cpu

env-dev:
	scripts/bootstrap.sh train,models,operator,dev,serve-cpu

bench: env
	$(VENV)/python bench/train_throughput.py --model smollm2
