# Two set-up commands on a fresh machine with only python3:  make demo  /  make test
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch is installed first and pinned (also in every later install), so nothing resolves a
# multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-all clean

$(VENV)/.torch:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	touch $@

# memmix with the extras after the dash: .installed-plot for the demo, .installed-dev for the tests
$(VENV)/.installed-%: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q "$(TORCH_SPEC)" -e ".[$*]"
	touch $@

# a results file is resumed by `memmix recall`: the demo starts from none, so that it always trains
demo: $(VENV)/.installed-plot
	rm -f runs/demo/recall.json
	$(VENV)/bin/memmix recall --json runs/demo/recall.json --plot runs/demo/recall.png

# Tests use tiny tensors and some start two processes: one intra-op thread each keeps them off each other's cores.
test: $(VENV)/.installed-dev
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q

test-all: $(VENV)/.installed-dev
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -m "not gpu"

clean:
	rm -rf $(VENV) build *.egg-info
