# make setup : .venv with the pinned set + the extension built in place (CUDA kernels when a toolkit is found)
# make test  : setup, then pytest (CPU; GPU tests skip without CUDA), the rounding-sensitive subset under each lower CPU
#              capability (test-isa), and the CMake/libtorch build + ctest
# make bench : setup, then the benchmarks on whatever device is present
# make test-slow : the tests marked slow (whole detectors through ONNX export + onnxruntime, 1-3 min each), left
#              out of make test
# make test-emulated : the long SIMT-emulator campaign (CUDA device code on the CPU; tests/simt/), ~30-40 min
# make peers : peer kernels' published sources/wheels into the ignored .peers/ (needs the registry; idempotent),
#              lap/lapjv into the venv as optional dev tools; benchmarks/peers.py builds them offline
# make lint  : ruff format --check + ruff check + clang-format --dry-run (config: .clang-format)
SHELL := /bin/bash
PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp
# nvcc on PATH may be a wrapper outside the toolkit; point torch at the real prefix when CUDA_HOME is unset.
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export MAX_JOBS
PYTEST_ARGS ?=
# make test leaves out the slow tier (make test-slow runs it); PYTEST_MARK= runs everything.
PYTEST_MARK ?= not slow
CMAKE_BUILD := build/cmake

.PHONY: peers setup build test test-py test-isa test-slow test-cmake test-emulated bench bench-quick lint format clean

setup: $(STAMP) build

$(STAMP): requirements-dev.txt pyproject.toml
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --upgrade -r requirements-dev.txt
	# Optional data for `--data neon-trees` and its tests: files only, so none of its heavy dependencies.
	$(PY) -m pip install --no-deps deepforest==2.1.0
	DEFORMABLE_DETR_NO_EXT=1 $(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $(STAMP)

# Incremental (ninja) in-place build of deformable_detr/_C*.so; the editable install above points at the tree.
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

test: setup test-py test-isa test-cmake

# Inductor's on-disk cache is the project's own, one per CPU capability: torch 2.14's FX graph cache does not key
# on ATEN_CPU_CAPABILITY, and an entry written under another capability compiled wrong (AVX-512 code in a default
# build fails to compile; default-capability entries reused at AVX-512 gave wrong numbers in test_msda_nan).
test-py:
	TORCHINDUCTOR_CACHE_DIR=$(abspath build)/inductor-cache-$${ATEN_CPU_CAPABILITY:-best} $(PY) -m pytest -q $(if $(PYTEST_MARK),-m "$(PYTEST_MARK)") $(PYTEST_ARGS)

# The slow tier (tests marked slow: full-detector ONNX export and onnxruntime at several sizes, ~2-3 min each).
test-slow: setup
	TORCHINDUCTOR_CACHE_DIR=$(abspath build)/inductor-cache-$${ATEN_CPU_CAPABILITY:-best} $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# The tests whose numbers depend on float rounding (models, criterion, matcher, the CPU kernels, inductor-compiled
# code) once more under each CPU capability below the best this machine runs (test-py ran them at the best):
# ATEN_CPU_CAPABILITY lowers ATen's kernels and this project's CPU kernel copy together. The emulated CUDA cases
# are left out: their device code does not follow ATen's capability. Each capability gets its own inductor cache
# (see test-py).
ISA_TESTS := tests/test_models.py tests/test_models_criterion.py tests/test_models_fast_paths.py \
  tests/test_models_inference.py tests/test_modules.py tests/test_matcher.py tests/test_assignment.py tests/test_msda.py \
  tests/test_msda_nan.py tests/test_msda_points.py tests/test_msda_cpu_backward_order.py tests/test_msda_wrapper.py \
  tests/test_checks_once.py
test-isa: $(STAMP)
	@for cap in $$($(PY) tests/support/cpu_isa.py --below-best); do \
	  echo "== ATEN_CPU_CAPABILITY=$$cap: $(words $(ISA_TESTS)) rounding-sensitive test files"; \
	  ATEN_CPU_CAPABILITY=$$cap TORCHINDUCTOR_CACHE_DIR=$(abspath build)/inductor-cache-$$cap $(PY) -m pytest -q -p no:cacheprovider -k "not emulated" $(ISA_TESTS) || exit 1; \
	done

test-cmake: $(STAMP)
	CMAKE_PREFIX_PATH=$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)') \
	$(VENV)/bin/cmake -S . -B $(CMAKE_BUILD) -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$(abspath $(PY)) \
	  $(if $(CUDA_HOME),-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME)) > $(CMAKE_BUILD).log 2>&1 || (cat $(CMAKE_BUILD).log; exit 1)
	$(VENV)/bin/cmake --build $(CMAKE_BUILD) -j $(MAX_JOBS)
	cd $(CMAKE_BUILD) && ../../$(VENV)/bin/ctest --output-on-failure

# >= 2,000 MSDA cases and >= 1,000 LSAP problems through the emulator, then the coverage table. The quick
# campaign (tests/test_simt_*.py) is part of test-py. The emulator is built once into build/simt.
test-emulated: $(STAMP)
	$(PY) -m pytest -q tests/test_simt_selftest.py tests/test_simt_msda.py tests/test_simt_lsap.py
	$(PY) tests/support/simt_campaign.py --msda $(or $(SIMT_MSDA),2000) --lsap $(or $(SIMT_LSAP),1000)

bench: setup
	$(PY) -m benchmarks $(BENCH_ARGS)

bench-quick: setup
	$(PY) -m benchmarks --quick $(BENCH_ARGS)

peers: $(STAMP)
	$(PY) -m benchmarks.peers fetch
	-$(PY) -m pip install --no-index --find-links .peers/dist --no-build-isolation lap lapjv || echo "lap/lapjv: not installed (not in .peers/dist: run make peers where the registry is reachable)"
	$(PY) -m benchmarks.peers status

lint: $(STAMP)
	$(VENV)/bin/ruff format --check deformable_detr tests benchmarks experiments setup.py
	$(VENV)/bin/ruff check deformable_detr tests benchmarks experiments setup.py
	$(VENV)/bin/clang-format --dry-run --Werror $$(find csrc tests/cpp tests/simt -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

format: $(STAMP)
	$(VENV)/bin/ruff format deformable_detr tests benchmarks experiments setup.py
	$(VENV)/bin/ruff check --fix deformable_detr tests benchmarks experiments setup.py
	$(VENV)/bin/clang-format -i $$(find csrc tests/cpp tests/simt -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

clean:
	rm -rf build deformable_detr/_C*.so *.egg-info
