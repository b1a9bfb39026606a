# Two entry points for a fresh machine (see README):
#   make demo   install, then fine-tune MiniLM-L6 with LoRA on rotten tomatoes and print base vs tuned accuracy
#   make test   install with test extras, then run the whole test suite
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
PIP      = $(BIN)/python -m pip
# torch first and pinned: an unpinned torch (or a package that asks for one) pulls a multi-GB CUDA build.
TORCH    = torch==2.13.0

.PHONY: install install-dev demo test clean

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

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
