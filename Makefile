# Two commands do everything on a fresh machine:
#   make demo   - set up .venv, build the extension, run the demo
#   make test   - set up .venv, build the extension, run the whole test suite
# Both are idempotent: set-up and build re-run only when their inputs change.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := build/stamps

# CUDA_HOME must be the toolkit root (its libraries in lib64). torch guesses it
# from nvcc's location, which misses when nvcc on PATH is a wrapper script.
NVCC := $(shell command -v nvcc 2>/dev/null)
ifeq ($(origin CUDA_HOME),undefined)
ifneq ($(NVCC),)
CUDA_HOME := $(shell d=$$(dirname $$(dirname $$(readlink -f "$(NVCC)"))); \
  if [ -d "$$d/lib64" ]; then echo $$d; \
  elif [ -x "$$d/bin/nvcc" ] && [ -d /usr/local/cuda/lib64 ]; then echo /usr/local/cuda; \
  elif [ -d /usr/local/cuda/lib64 ]; then echo /usr/local/cuda; fi)
endif
endif
ifneq ($(CUDA_HOME),)
export CUDA_HOME
endif
export MAX_JOBS ?= 2

CSRC := $(shell find csrc -type f -name '*.cpp' -o -type f -name '*.cu' -o -type f -name '*.h' -o -type f -name '*.cuh')

.PHONY: demo test build bench clean venv gpu-check

venv: $(STAMP)/venv
$(STAMP)/venv: requirements.txt
	@mkdir -p $(STAMP)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@# Put this checkout on the venv's path, so that .venv/bin/python imports colorquant_ops from anywhere.
	$(PY) -c "import os, site; open(os.path.join(site.getsitepackages()[0], 'colorquant_ops-checkout.pth'), 'w').write(os.getcwd() + '\n')"
	@touch $@

build: $(STAMP)/ext
$(STAMP)/ext: $(STAMP)/venv setup.py $(CSRC)
	@echo "building colorquant_ops._C (CUDA_HOME=$(CUDA_HOME), TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-8.0;9.0}, COLORQUANT_CPU_ONLY=$${COLORQUANT_CPU_ONLY:-0})"
	$(PY) setup.py -q build_ext --inplace
	@touch $@

demo: build
	$(PY) -m colorquant_ops demo

test: build
	$(PY) -m pytest colorquant_ops_tests

# e.g. make bench BENCH_ARGS="--quick --only ops"
BENCH_ARGS ?=
bench: build
	$(PY) -m benchmarks $(BENCH_ARGS)

# On a GPU machine (torch preinstalled, no venv, no network): build for this GPU's
# architecture with all cores, every CUDA test, compute-sanitizer, the quick CUDA
# benchmarks; logs and tables in GPU_CHECK_OUT. Prints the plan and exits 0
# without a GPU. Uses .venv's python if there is one, else python3; it never
# creates a venv or installs anything.
GPU_CHECK_OUT ?= build/gpu-check
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_OUT)

clean:
	rm -rf build colorquant_ops/_C*.so
