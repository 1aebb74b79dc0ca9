# Two set-up commands on a fresh machine with only python3:  make demo  /  make test
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch is installed first and pinned, so nothing resolves a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-all clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/memmix recall

# Tests use tiny tensors and some start two processes: one intra-op thread each keeps them off each other's cores.
test: $(VENV)/.installed
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q

test-all: $(VENV)/.installed
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -m "not gpu"

clean:
	rm -rf $(VENV) build *.egg-info
