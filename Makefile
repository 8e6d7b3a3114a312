# make demo : build the environment, make a synthetic face dataset, train on 2 CPU ranks, report accuracy
# make test : build the environment, lint, and run the test suite, tests/unit (all but the long fault tests)
# make test-faults : the long launch and fault tests, tests/faults (signals, restarts, several nodes, DeepSpeed)
# make check : both, as CI runs them
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A machine without an NVIDIA driver gets the CPU build of torch (requirements/cpu.txt), never the multi-GB CUDA one;
# the CPU wheel comes from a wheel folder pip is pointed at (PIP_FIND_LINKS), else from download.pytorch.org.
ifeq ($(shell command -v nvidia-smi),)
BUILD_LOCK := requirements/cpu.txt
TORCH_FALLBACK_INDEX := --extra-index-url https://download.pytorch.org/whl/cpu
else
BUILD_LOCK := requirements/cuda.txt
TORCH_FALLBACK_INDEX :=
endif
LOCKS := requirements/pinned.txt $(BUILD_LOCK) requirements/deepspeed.txt
STAMP := $(VENV)/.installed

.PHONY: env lint test test-faults check demo clean

env: $(STAMP)

# Every pip step is constrained by the locks, so nothing can move torch; the environment is then checked against them.
$(STAMP): pyproject.toml $(LOCKS) tools/check_lock.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r $(BUILD_LOCK) || $(BIN)/pip install -q -r $(BUILD_LOCK) $(TORCH_FALLBACK_INDEX)
	$(BIN)/pip install -q -r requirements/pinned.txt -c $(BUILD_LOCK)
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -r requirements/deepspeed.txt $(addprefix -c ,$(LOCKS))
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python tools/check_lock.py $(LOCKS)
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check sface_dist tools tests

test: lint
	$(BIN)/python -m pytest -q tests/unit

test-faults: $(STAMP)
	$(BIN)/python -m pytest -q tests/faults

check: test test-faults

demo: $(STAMP)
	$(BIN)/python tools/make_demo_data.py --out data/demo
	$(BIN)/torchrun --nproc_per_node=2 -m sface_dist.train configs/demo.yaml

clean:
	rm -rf $(VENV) runs/demo data/demo
