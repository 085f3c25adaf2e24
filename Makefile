# Everything a fresh machine needs: `make demo` and `make test` create .venv, install, and get
# the data first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; installing it first keeps pip from
# pulling a multi-GB CUDA build for our `torch>=2.3` requirement.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test install data clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Fashion-MNIST: found where it is, else Debian's package, else downloaded (scripts/get-data).
data: $(STAMP)
	@scripts/get-data $(BIN)/python

demo: data
	$(BIN)/neumeta demo --config configs/demo.yaml

test: data
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
