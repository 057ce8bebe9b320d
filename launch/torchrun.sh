#!/usr/bin/env bash
# Train with torchrun on this node. Every argument is a Hydra override for `python -m train`:
#   launch/torchrun.sh strategy=ddp train.max_steps=100
# Processes per node: NPROC_PER_NODE, else the GPUs present (1 on a CPU-only node).
# Multi-node: run it on every node with NNODES, NODE_RANK, MASTER_ADDR (node 0's address) and
# MASTER_PORT set; the nodes meet through torchrun's c10d rendezvous hosted on node 0.
# Extra torchrun flags (e.g. --max-restarts=3) go in TORCHRUN_ARGS.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

nproc="$(lmf_nproc_per_node)"
nnodes="${NNODES:-1}"
lmf_is_posint "$nnodes" || lmf_die "NNODES='$nnodes' is not a positive integer"
read -r -a extra <<<"${TORCHRUN_ARGS:-}"

if (( nnodes == 1 )); then
  # one node: a private rendezvous on a free local port
  rdzv=(--standalone)
else
  node_rank="${NODE_RANK:-}"
  lmf_is_nonneg "$node_rank" && (( node_rank < nnodes )) \
    || lmf_die "NODE_RANK='$node_rank' must be set to an integer in [0, $nnodes) when NNODES=$nnodes"
  [[ -n "${MASTER_ADDR:-}" ]] || lmf_die "MASTER_ADDR is not set (node 0's address is needed when NNODES=$nnodes)"
  port="${MASTER_PORT:-29500}"
  lmf_is_posint "$port" && (( port < 65536 )) || lmf_die "MASTER_PORT='$port' is not a port number (1-65535)"
  rdzv=(--nnodes="$nnodes" --node_rank="$node_rank" --rdzv_backend=c10d
        --rdzv_endpoint="$MASTER_ADDR:$port" --rdzv_id="${RDZV_ID:-lmforge}"
        --rdzv_conf="is_host=$(( node_rank == 0 ))")
fi

exec "$LMF_PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node="$nproc" "${extra[@]}" \
  -m train "$@"
