# The two commands of the README, and what they are made of.
.PHONY: quickstart test e2e lint env env-dev bench

VENV := .venv/bin

quickstart: env
	$(VENV)/tuneloom models prepare smollm2-135m-instruct
	$(VENV)/tuneloom validate-data examples/support-tickets/train.jsonl --model $$($(VENV)/tuneloom models prepare smollm2-135m-instruct) --max-seq-length 512 --batch-size 4 --epochs 2
	$(VENV)/tuneloom train -f examples/quickstart.yaml --fresh
	$(VENV)/python -I examples/support-tickets/ask_over_http.py --store out/store
	$(VENV)/tuneloom report out/store/adapters/default/support-tickets --output out/support-tickets-report.html

test: env-dev
	$(VENV)/ruff check .
	$(VENV)/pytest

# The whole loop (chart, operator, trainer, vLLM, Prometheus) on the local cluster with SmolLM2.
e2e: env-dev
	TUNELOOM_E2E_MODEL=smollm2 TUNELOOM_DASHBOARD_PNG_DIR=docs/dashboards $(VENV)/pytest tests/test_e2e.py -v

lint: env-dev
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

env:
	scripts/bootstrap.sh train,models,serve-cpu,api

env-dev:
	scripts/bootstrap.sh train,models,operator,dev,serve-cpu,api

bench:
	scripts/bootstrap.sh train,models,operator,dev,serve-cpu,api,bench
	$(VENV)/python bench/train_throughput.py --model smollm2
	$(VENV)/python bench/dpo_throughput.py --model smollm2
	$(VENV)/python bench/serving.py --model smollm2
	$(VENV)/python bench/operator_scale.py
