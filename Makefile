# Two commands do everything from a fresh clone: `make train` and `make test`.
# Both build .venv (CPU torch when no GPU is present) and re-running is fast when nothing changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_CPU ?= torch==2.13.0

.PHONY: train test test-fast setup slurm lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing the default (CUDA) torch build"; $(PY) -m pip install -q torch; \
	else \
		echo "no GPU: installing the CPU build $(TORCH_CPU)"; $(PY) -m pip install -q $(TORCH_CPU); \
	fi
	# deepspeed's sdist imports torch at build time: build it against the torch just installed
	$(PY) -m pip install -q --no-build-isolation deepspeed
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m train $(ARGS)

# The Slurm integration tests start a real cluster from Debian's slurm-wlm: install it when missing
# (as root). Under CI=true a failed install stops `make test` here, naming Slurm; elsewhere the Slurm
# tests skip and say why. SLURM_INSTALL replaces the install command (e.g. `false` to see the failure).
SLURM_INSTALL ?= bash launch/slurm/install-slurm.sh
slurm:
	@if $(SLURM_INSTALL); then :; \
	elif case "$${CI:-}" in [Tt]rue|TRUE|1|[Yy]es) true ;; *) false ;; esac; then \
		echo "make: CI=true requires Slurm (Debian's slurm-wlm) for the Slurm tests, and '$(SLURM_INSTALL)' failed (reason above)" >&2; exit 1; \
	else echo "make: Slurm (slurm-wlm) is unavailable: the Slurm tests will skip and say why (under CI=true this is an error)" >&2; fi

# pytest ends with every skipped test and its reason (tests/conftest.py), then -ra's short summary.
# Under CI=true only tests that need hardware this machine lacks (the `gpu` marker) may skip.
test: $(STAMP) slurm
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The edit loop: single-process tests only (no torchrun / gloo groups / Slurm / DeepSpeed runs): a few minutes.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check model train tests

clean:
	rm -rf $(VENV) runs outputs multirun wandb
