# Tessera: every workflow starts here. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV_VERSION ?= 0.13.9
UV := $(or $(shell command -v uv 2>/dev/null),$(CURDIR)/.run/uv/bin/uv)
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
export UV_PYTHON_DOWNLOADS := never
export TESSERA_ROOT := $(CURDIR)

.PHONY: promtool
.PHONY: help run up down test lint typecheck imports dockerlint pytest bench venv setup format routing-simulate chaos browser screenshots loadtest security

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

$(CURDIR)/.run/uv/bin/uv:
	python3 -m venv $(CURDIR)/.run/uv
	$(CURDIR)/.run/uv/bin/pip install --quiet "uv==$(UV_VERSION)"

venv: $(UV) ## create .venv and install exactly what uv.lock pins
	$(UV) sync --frozen --quiet

setup: venv ## Postgres and Redis reachable (private ones if needed), databases, roles, migrations
	$(BIN)/tessera dev setup

run: venv ## set up, start every service in the foreground, print URLs and demo credentials
	$(BIN)/tessera dev run

up: venv ## the same as run, in the background; returns when every service is ready
	$(BIN)/tessera dev up

down: ## stop what `make up` started (and private Postgres/Redis it started), nothing else
	@if [ -x $(BIN)/tessera ]; then $(BIN)/tessera dev down; else echo "nothing to stop"; fi

lint: venv ## ruff (lint + format check), mypy, import rules, hadolint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile.api Dockerfile.vault deploy/Dockerfile.sandbox deploy/loadtest/Dockerfile

security: venv ## bandit, semgrep (.semgrep/ rules, offline), detect-secrets + card numbers, pip-audit
	$(BIN)/bandit -q -c pyproject.toml -r core api vault sandbox tessera
	@$(MAKE) --no-print-directory -j3 -O security-semgrep security-secrets security-audit

.PHONY: security-semgrep security-secrets security-audit
security-semgrep:
	$(BIN)/semgrep scan --metrics=off --disable-version-check --quiet --error --config .semgrep/ core api vault sandbox tessera
security-secrets:
	$(BIN)/python -m tessera.security.secrets_check
security-audit:  # prints "pip-audit: NOT CHECKED ... NOT a pass" (exit 0) when advisories are unreachable
	$(BIN)/python -m tessera.security.pip_audit_gate

format: venv ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

browser: ## Debian's chromium for the browser tests (installed with apt-get as root if missing)
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser tests ..."; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "chromium is missing: run 'sudo apt-get install chromium' (the browser tests need it)"; fi

promtool: ## Debian's promtool for the alert-rule tests (installed with apt-get as root if missing)
	@if command -v promtool >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's prometheus package (promtool) for the alert-rule tests ..."; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	else echo "promtool is missing: run 'sudo apt-get install prometheus' (tests/test_alert_rules.py needs it)"; fi

pytest: setup browser promtool ## the pytest suite alone (real Postgres and Redis, headless Chromium)
	$(BIN)/pytest

test: setup lint security deploy-check pytest ## everything CI runs: set-up, lint, type check, import rules, security checks, deploy checks, tests

DEPLOY_VENV := $(CURDIR)/.venv-deploy
.PHONY: deploy-venv deploy-check
deploy-venv: $(UV)  # checkov and friends pin old packages, so they live in their own environment
	UV_PROJECT_ENVIRONMENT=$(DEPLOY_VENV) $(UV) sync --frozen --quiet --only-group deploy-check

deploy-check: venv deploy-venv ## deploy/ offline: kustomize renders, kubernetes-validate --strict, checkov (k8s, Terraform, Dockerfiles), yamllint, HCL parse
	@command -v kubectl >/dev/null 2>&1 || { echo "kubectl is missing: install it (https://kubernetes.io/docs/tasks/tools/ or 'gcloud components install kubectl'); make deploy-check needs 'kubectl kustomize'"; exit 1; }
	@command -v terraform >/dev/null 2>&1 || { echo "terraform is missing: install Terraform >= 1.6 (HashiCorp's apt repository or release zip); make deploy-check runs 'terraform fmt -check' (it needs no provider and no network)"; exit 1; }
	TESSERA_DEPLOY_VENV=$(DEPLOY_VENV) $(BIN)/python -m tests.deploy

loadtest: venv ## a short headless Locust run against `make up` (ARGS="..." for Locust); results in loadtests/results/
	$(BIN)/python -m loadtests.run $(ARGS)

bench: setup ## benchmarks that print numbers (never timed assertions in tests)
	$(BIN)/python -m tests.bench

bench-recovery: setup ## what recovering declined renewals costs: the decline's latency, the worker's retries/s
	$(BIN)/python -m tests.bench.recovery

.PHONY: capacity diagram recovery-simulate bench-recovery
recovery-simulate: venv ## learned vs fixed retry schedule for failed renewals, 100,000 synthetic customers (about 35 s)
	$(BIN)/tessera recovery simulate --seed 1 --customers 100000

capacity: setup ## the capacity model of docs/deploy.md: per-payment database and Redis work counted, with bench.json's CPU (ARGS="--cpu api=3.32,...")
	$(BIN)/python -m tests.bench.capacity $(ARGS)

diagram: venv ## redraw docs/img/segments.svg from deploy/flows.yaml (Graphviz, installed with apt-get as root if missing)
	@command -v dot >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null; } || { echo "install Graphviz (apt-get install graphviz)"; exit 1; }
	$(BIN)/python -m tests.deploy.diagram

routing-simulate: venv ## the router against always-A and always-B on `make up`'s stack
	set -a; . .run/dev.env; set +a; $(BIN)/tessera routing simulate --traffic docs/examples/routing-traffic.json

screenshots: setup browser ## redraw docs/img/checkout-*.png from the demo checkout in Chromium
	TESSERA_SCREENSHOTS=docs/img $(BIN)/pytest -q tests/test_checkout_browser.py -k shopper_pays

chaos: setup ## about 13 min: 5 of traffic through PSP faults and killed processes, storage faults (Postgres stop and failover, async vs sync replication; Redis loss; a frozen API), then network faults on every hop under load
	rc=0; \
	CHAOS_SECONDS=$${CHAOS_SECONDS:-300} $(BIN)/python -m tests.chaos || rc=1; \
	CHAOS_STORAGE_SECONDS=$${CHAOS_STORAGE_SECONDS:-40} $(BIN)/python -m tests.chaos_storage || rc=1; \
	TESSERA_CHAOS_NETWORK_FULL=1 TESSERA_CHAOS_NETWORK_SECONDS=$${CHAOS_NETWORK_SECONDS:-120} \
		$(BIN)/pytest tests/test_chaos_network.py -q -s -p no:cacheprovider || rc=1; \
	exit $$rc

.PHONY: evidence pci-docs
evidence: venv ## the assessor's kit against `make up`'s stack: report.md/.json in evidence/DATE/ (OUT=dir; docs/pci/assessor-guide.md)
	$(BIN)/tessera pci evidence --dev-stack --out $${OUT:-evidence/$$(date -u +%Y-%m-%d)}

pci-docs: venv ## regenerate docs/pci/controls.md and the cardholder-data flow diagram (Graphviz, installed with apt-get as root if missing)
	@command -v dot >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null; } || { echo "install Graphviz (apt-get install graphviz)"; exit 1; }
	$(BIN)/python -m tessera.pci.controls

.PHONY: segmentation
segmentation: venv ## network segmentation (PCI DSS 11.4.5): flows.yaml as nftables rules between network namespaces, the real services inside, the probe matrix (root; installs nftables and socat if missing)
	@missing=""; for tool in nft socat; do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's nftables and socat for the segmentation test ..."; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables socat >/dev/null; fi
	$(BIN)/python -m tests.segmentation

.PHONY: crash
crash: setup ## a crash at every step: every failpoint x authorize, capture, refund, cancel x PSP A and B, and the worker's, SIGKILLed and retried (~2 min)
	TESSERA_CRASH_MATRIX=full $(BIN)/pytest -q tests/test_crash_points.py

.PHONY: fuzz
fuzz: venv ## Schemathesis on both services of `make up`'s stack (every phase and check, FUZZ_EXAMPLES=200 per operation), then the lifecycle model's long run
	$(BIN)/python -m tests.fuzz
	TESSERA_LIFECYCLE=fuzz $(BIN)/pytest -q tests/test_lifecycle_model.py
