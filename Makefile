# Two entry points for a fresh machine (see README):
#   make demo   install, then fine-tune MiniLM-L6 with LoRA on rotten tomatoes and print base vs tuned accuracy
#   make test   install with test extras and the browser, then run the whole test suite
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
PIP      = $(BIN)/python -m pip
# torch first and pinned: an unpinned torch (or a package that asks for one) pulls a multi-GB CUDA build.
TORCH    = torch==2.13.0

# The browser tests drive Debian's chromium through Playwright (never a browser download): installed here when
# missing, as root or through sudo. Elsewhere, install chromium yourself or set CHROMIUM=/path/to/chrome.
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install install-dev demo test browser clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $@

install install-dev: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/tunesmith train examples/sentiment-lora.yaml --force

browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || [ -n "$$CHROMIUM" ] || \
	  { command -v apt-get >/dev/null && $(SUDO) apt-get update -q && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || \
	  echo "warning: no chromium: the browser tests will be skipped (and fail under CI)"

test: $(VENV)/.installed browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
