# Two entry points for a fresh machine (see README):
#   make demo   install, then fine-tune MiniLM-L6 with LoRA on rotten tomatoes and print base vs tuned accuracy
#   make test   install with test extras and the browser, then run the whole test suite
# and, for maintainers, one more (not part of make test):
#   make llama-cpp   build llama.cpp's llama-completion and llama-quantize for bench/gguf_llamacpp.py
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
PIP      = $(BIN)/python -m pip
# torch first and pinned: an unpinned torch (or a package that asks for one) pulls a multi-GB CUDA build.
TORCH    = torch==2.13.0

# The browser tests drive Debian's chromium through Playwright (never a browser download): installed here when
# missing, as root or through sudo. Elsewhere, install chromium yourself or set CHROMIUM=/path/to/chrome.
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The `tunesmith` command runs on jemalloc when Debian's libjemalloc2 is installed (src/tunesmith/allocator.py: less
# than half the peak memory of glibc's malloc on LM training, and no slower): installed here when missing, like
# chromium; without it the command stays on glibc.
JEMALLOC = /usr/lib/$(shell uname -m)-linux-gnu/libjemalloc.so.2

.PHONY: install install-dev demo test browser allocator clean llama-cpp

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $@

install install-dev: $(VENV)/.installed

demo: $(VENV)/.installed allocator
	$(BIN)/tunesmith train examples/sentiment-lora.yaml --force

browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || [ -n "$$CHROMIUM" ] || \
	  { command -v apt-get >/dev/null && $(SUDO) apt-get update -q && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || \
	  echo "warning: no chromium: the browser tests will be skipped (and fail under CI)"

allocator:
	@[ -e $(JEMALLOC) ] || [ "$$(uname -s)" != Linux ] || \
	  { command -v apt-get >/dev/null && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q libjemalloc2 2>/dev/null || \
	    { $(SUDO) apt-get update -q && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q libjemalloc2; }; } || \
	  echo "note: no libjemalloc2: the tunesmith command uses glibc's malloc (more memory; see docs/performance.md)"

test: $(VENV)/.installed browser allocator
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# llama.cpp, to check GGUF exports with llama.cpp itself (bench/gguf_llamacpp.py), built from source: only package
# registries are reachable from where tunesmith is developed (no release binaries), and the llama-cpp-python sdist
# vendors llama.cpp's C/C++ source. The pin fixes the llama.cpp commit, so results can be compared. CPU only; only
# the two tools the check needs, no HTTPS model downloads (LLAMA_OPENSSL=OFF). JOBS=1 when the machine is busy.
# Built for AVX2, not -march=native: a CPU that advertises AMX where the kernel does not grant it (containers,
# sandboxes) gets native builds that die with SIGILL on every quantized type (f32 alone runs).
LLAMA_CPP_PYTHON = 0.3.36
LLAMA_DIR        = .cache/llama.cpp
JOBS            ?= $(shell nproc)

llama-cpp: $(LLAMA_DIR)/build/bin/llama-completion

$(LLAMA_DIR)/build/bin/llama-completion:
	$(PY) -m pip download -q --no-binary :all: --no-deps -d $(LLAMA_DIR) llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar xzf $(LLAMA_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_DIR)
	cmake -S $(LLAMA_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp -B $(LLAMA_DIR)/build \
	  -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
	  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
	  -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
	cmake --build $(LLAMA_DIR)/build -j $(JOBS) --target llama-completion llama-quantize

clean:
	rm -rf $(VENV) runs .pytest_cache
