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

# Dev set-up also needs Debian's chromium (tests/browser.py renders HTML reports headless). While it is
# missing, .dev is always out of date, so an old checkout gets it on its next `make test` too.
CHROMIUM := $(shell command -v chromium 2>/dev/null || { test -x /usr/bin/chromium && echo /usr/bin/chromium; })
FORCE:

$(VENV)/.dev: $(VENV)/.runtime requirements/dev.txt $(if $(CHROMIUM),,FORCE)
	$(PY) -m pip install --quiet -r requirements/dev.txt
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else SUDO=no; fi; \
	  if [ "$$SUDO" != no ] && command -v apt-get >/dev/null 2>&1 \
	    && echo "Installing Debian package chromium (for the browser tests)..." \
	    && $$SUDO apt-get update -qq \
	    && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  then chromium --version 2>/dev/null || true; \
	  else echo "WARNING: Debian package chromium is not installed and could not be installed here;" \
	    "browser tests will be skipped. Install it as root: apt-get install -y --no-install-recommends chromium" >&2; \
	  fi; }
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
