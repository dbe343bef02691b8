# The README's two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_DATA := data/synth

.PHONY: demo test test-fast bench gpu-check clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e '.[test]'
	@# Byte-compile on every core: pip compiles one file at a time (half a minute on 2 cores).
	@# As with pip, a file that does not compile (torch ships Python 3.12-only test files) is
	@# simply left uncompiled.
	@$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true
	@touch $(STAMP)

$(DEMO_DATA)/dataset.json: | $(STAMP)
	$(BIN)/expertpar data synth --out $(DEMO_DATA) --n 6000 --n-test 1000

demo: $(STAMP) $(DEMO_DATA)/dataset.json
	$(BIN)/expertpar train jobs/quickstart.yaml --no-resume
	$(BIN)/expertpar eval runs/quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10

# The inner loop: everything but the end-to-end runs marked slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP) $(DEMO_DATA)/dataset.json
	$(BIN)/expertpar bench jobs/quickstart.yaml --out bench-results

# On a CUDA machine: the GPU tests, then expert FFN TFLOP/s and the reference layer's
# Ray/in-process ratio on the GPU (bench-results/gpu_check.json). Under 8 minutes.
gpu-check: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu tests
	$(BIN)/expertpar gpu-check --out bench-results

clean:
	rm -rf runs data/synth .pytest_cache
