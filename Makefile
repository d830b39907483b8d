# make test   set up .venv (CPU torch where there is no GPU) and run the test suite
# make demo   set up .venv, compile the baseline zoo model, train it briefly on CPU, generate
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch 2.13.0 is the CPU build this machine kind serves from local files; on a machine with
# a GPU, pip resolves the range in pyproject.toml instead.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4,<2.15" || echo "torch==2.13.0")

.PHONY: venv test demo lint clean gpu-wheels

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# the suite in one worker per core (pytest-xdist); tests that write take their own tmp dirs
# and kernel caches (the shared one is safe with two processes compiling at once).
# JOBS=0 runs it in pytest's own process, JOBS=N in N workers.
JOBS   ?= auto
test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) --dist worksteal

demo: $(STAMP)
	$(VENV)/bin/lmc compile zoo/llama.yaml --preset small
	$(VENV)/bin/lmc run zoo/llama.yaml --train --preset small --steps 60 --batch-size 4 \
		--seq-len 64 --eval-every 20 --out runs/demo --overwrite
	$(VENV)/bin/lmc run zoo/llama.yaml --generate --checkpoint runs/demo --prompt "import " \
		--max-new-tokens 48 --temperature 0.8 --top-k 40

lint: $(STAMP)
	$(VENV)/bin/ruff check lmc tests

# wheels benchmarks/gpu_session.sh installs on the GPU machine (no internet there): the
# flash-linear-attention kernels (fla-core) the linear-attention benchmark compares against;
# pass carry [".whl"] to the device call
gpu-wheels: $(STAMP)
	$(PY) -m pip download --no-deps -d .whl fla-core==0.6.0 einops==0.8.2

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
