#!/usr/bin/env bash
# Train with the DeepSpeed launcher. Every argument is a Hydra override for `python -m train`;
# strategy=zero3 is added unless one is given:
#   launch/deepspeed.sh train.max_steps=100
# Hostfile: HOSTFILE (lines "host slots=N") or, when unset, one generated for this node with
# NPROC_PER_NODE (else the GPUs present, 1 on CPU) slots.
# Multi-node without ssh: run it on every node with the same HOSTFILE plus NODE_RANK and
# MASTER_ADDR (node 0's address); MASTER_PORT defaults to 29500. Set DS_USE_SSH=1 to let DeepSpeed
# start the other nodes itself over pdsh/ssh instead. SIGTERM (pre-emption) reaches every rank.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

port="${MASTER_PORT:-29500}"
lmf_is_posint "$port" && (( port < 65536 )) || lmf_die "MASTER_PORT='$port' is not a port number (1-65535)"

if [[ -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || lmf_die "HOSTFILE='$HOSTFILE' does not exist (give a file of 'host slots=N' lines, or unset HOSTFILE for this node only)"
  grep -Eq '^[^#[:space:]]+[[:space:]]+slots=[1-9][0-9]*' "$HOSTFILE" \
    || lmf_die "HOSTFILE='$HOSTFILE' has no 'host slots=N' line"
  hostfile="$HOSTFILE"
  nhosts="$(grep -Ec '^[^#[:space:]]+[[:space:]]+slots=' "$hostfile")"
else
  hostfile="$(mktemp "${TMPDIR:-/tmp}/lmforge-hostfile.XXXXXX")"
  trap 'rm -f "$hostfile"' EXIT   # only read before the launcher starts (removed again before exec)
  nproc="$(lmf_nproc_per_node)"
  echo "localhost slots=$nproc" >"$hostfile"
  nhosts=1
fi

node_rank="${NODE_RANK:-0}"
lmf_is_nonneg "$node_rank" && (( node_rank < nhosts )) \
  || lmf_die "NODE_RANK='$node_rank' must be an integer in [0, $nhosts) for the $nhosts host(s) in $hostfile"
if (( nhosts > 1 )) && [[ -z "${MASTER_ADDR:-}" ]]; then
  lmf_die "MASTER_ADDR is not set (node 0's address is needed for the $nhosts hosts in $hostfile)"
fi

args=()
lmf_has_override strategy "$@" || args+=(strategy=zero3)
port_args=(--master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="$port")

if [[ "${DS_USE_SSH:-0}" == 1 ]]; then
  # DeepSpeed's runner starts every node itself over pdsh/ssh
  exec "$LMF_PYTHON" -m deepspeed.launcher.runner --hostfile="$hostfile" "${port_args[@]}" \
    --no_local_rank --module train "${args[@]}" "$@"
fi

# No ssh: this node starts its own ranks with DeepSpeed's per-node launcher (what `deepspeed --no_ssh`
# runs), exec'd so that SIGTERM reaches it and it forwards it to every rank. The world layout is
# DeepSpeed's own encoding of the hostfile.
world_info="$("$LMF_PYTHON" - "$hostfile" <<'PY' 2>/dev/null
import sys
from deepspeed.launcher.runner import encode_world_info, fetch_hostfile
pool = fetch_hostfile(sys.argv[1])
print(encode_world_info({host: list(range(slots)) for host, slots in pool.items()}))
PY
)" || lmf_die "cannot read HOSTFILE '$hostfile' with DeepSpeed (is deepspeed installed in $LMF_PYTHON?)"
[[ -n "${HOSTFILE:-}" ]] || rm -f "$hostfile"
exec "$LMF_PYTHON" -u -m deepspeed.launcher.launch --world_info="$world_info" --node_rank="$node_rank" \
  "${port_args[@]}" --no_local_rank --module train "${args[@]}" "$@"
