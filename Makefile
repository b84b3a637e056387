# zero-adam: `make test` and `make train` set themselves up on a fresh machine (Python >= 3.10).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
NPROC  ?= 2
CONFIG ?= configs/tiny.yaml

.PHONY: setup test lint train bench plan clean

# The venv is rebuilt when pyproject.toml changes; it holds every extra, since the suite also tests
# the optional integrations (transformers, accelerate, deepspeed). torch is pinned only when none is importable:
# on these machines `pip install torch==2.13.0` takes a CPU wheel from disk, while an open range
# would resolve to a multi-GB CUDA build. pyproject.toml keeps the range for users.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[train,test,hf,bench]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q --durations=15 tests

lint: setup
	$(VENV)/bin/ruff check zero_adam launch tests bench

# Validate the config before torchrun starts any process, so mistakes print as one clean message.
train: setup
	$(PY) launch/train.py --config $(CONFIG) --check $(ARGS)
	$(VENV)/bin/torchrun --standalone --nproc-per-node=$(NPROC) launch/train.py --config $(CONFIG) $(ARGS)

# Benchmark against the no-communication floor, DDP, torch ZeRO, DeepSpeed ZeRO-1/2 and FSDP2; writes docs/benchmarks.md (~45 min on 2 cores).
bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
