# make demo : build the environment, make a synthetic face dataset, train on 2 CPU ranks, report accuracy
# make test : build the environment, lint, and run the test suite (all but the long fault tests)
# make test-faults : the long launch and fault tests (signals, restarts, several nodes, DeepSpeed)
# make check : both, as CI runs them
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
# A machine without an NVIDIA driver gets the CPU build of torch, never the multi-GB CUDA one.
ifeq ($(shell command -v nvidia-smi),)
TORCH_SPEC := torch==$(TORCH_VERSION)+cpu
TORCH_FALLBACK_INDEX := --index-url https://download.pytorch.org/whl/cpu
else
TORCH_SPEC := torch==$(TORCH_VERSION)
TORCH_FALLBACK_INDEX :=
endif
STAMP := $(VENV)/.installed

.PHONY: env lint test test-faults check demo clean

env: $(STAMP)

$(STAMP): pyproject.toml requirements/pinned.txt requirements/deepspeed.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)" || $(BIN)/pip install -q "$(TORCH_SPEC)" $(TORCH_FALLBACK_INDEX)
	$(BIN)/pip install -q -r requirements/pinned.txt
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -r requirements/deepspeed.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check sface_dist tools tests

test: lint
	$(BIN)/python -m pytest -q -m "not faults" tests

test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -m faults tests

check: test test-faults

demo: $(STAMP)
	$(BIN)/python tools/make_demo_data.py --out data/demo
	$(BIN)/torchrun --nproc_per_node=2 -m sface_dist.train configs/demo.yaml

clean:
	rm -rf $(VENV) runs/demo data/demo
