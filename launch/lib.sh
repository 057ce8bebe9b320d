# Shared helpers for lmforge's launch scripts (sourced, not run).
# Sets LMFORGE_ROOT, puts the project's .venv first on PATH when one exists, and defines helpers.

lmf_die() { echo "$(basename "${0}"): $*" >&2; exit 2; }

# The repo root: $LMFORGE_ROOT if set, else the parent of this file's directory.
LMFORGE_ROOT="${LMFORGE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export LMFORGE_ROOT

# python = the first on PATH; activate the repo's .venv first when present and none is active.
if [[ -z "${VIRTUAL_ENV:-}" && -x "$LMFORGE_ROOT/.venv/bin/python" ]]; then
  export VIRTUAL_ENV="$LMFORGE_ROOT/.venv"
  export PATH="$VIRTUAL_ENV/bin:$PATH"
fi
LMF_PYTHON="$(command -v python || command -v python3 || true)"
[[ -n "$LMF_PYTHON" ]] || lmf_die "no python on PATH (create the project venv with 'make setup')"
# `python -m train` must import the project even when it is not pip-installed.
export PYTHONPATH="$LMFORGE_ROOT${PYTHONPATH:+:$PYTHONPATH}"

lmf_is_posint() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
lmf_is_nonneg() { [[ "$1" =~ ^(0|[1-9][0-9]*)$ ]]; }

# Processes per node: $NPROC_PER_NODE, else the GPUs Slurm gave this node, else the GPUs present, else 1.
lmf_nproc_per_node() {
  local n=""
  if [[ -n "${NPROC_PER_NODE:-}" ]]; then
    lmf_is_posint "$NPROC_PER_NODE" || lmf_die "NPROC_PER_NODE='$NPROC_PER_NODE' is not a positive integer"
    n="$NPROC_PER_NODE"
  elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]] && lmf_is_posint "${SLURM_GPUS_ON_NODE}"; then
    n="$SLURM_GPUS_ON_NODE"
  elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != "-1" ]]; then
    n="$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    n="$(nvidia-smi -L | grep -c '^GPU')"
  fi
  lmf_is_posint "${n:-0}" || n=1
  echo "$n"
}

# True when one of the overrides "$2..." sets key $1 (e.g. lmf_has_override run.dir "$@").
lmf_has_override() {
  local key="$1" a; shift
  for a in "$@"; do [[ "$a" == "$key="* || "$a" == "+$key="* || "$a" == "++$key="* ]] && return 0; done
  return 1
}
