# The body of lmforge's sbatch scripts, sourced by them after LMF_LAUNCHER=torchrun|deepspeed is set;
# "$@" are the job's Hydra overrides.
#
# One srun task per node. Node 0's address (its NodeAddr) is the rendezvous endpoint. torchrun nodes
# meet through c10d rendezvous hosted on node 0; DeepSpeed nodes run DeepSpeed's per-node launcher
# with a hostfile written from the allocation (no ssh/pdsh). A pre-emption signal (SIGUSR1 from
# `--signal=B:USR1@<s>`, or SIGTERM) is forwarded to the training ranks as SIGTERM: the trainer
# finishes its step, checkpoints and exits; after SIGUSR1 the job requeues itself and the next run
# resumes from the checkpoint (resume=auto in the job-id keyed run dir).

source "$LMFORGE_ROOT/launch/lib.sh"
[[ -n "${SLURM_JOB_ID:-}" ]] || lmf_die "run this inside a Slurm batch job: sbatch $0 <overrides>"
case "${LMF_LAUNCHER:-}" in torchrun|deepspeed) ;; *) lmf_die "LMF_LAUNCHER='${LMF_LAUNCHER:-}' must be torchrun or deepspeed" ;; esac

# last value given for a Hydra key among the overrides, or empty
lmf_override_value() {
  local key="$1" a v=""; shift
  for a in "$@"; do
    case "$a" in "$key="*|"+$key="*|"++$key="*) v="${a#*=}" ;; esac
  done
  echo "$v"
}

nnodes="$SLURM_JOB_NUM_NODES"
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node="${nodes[0]}"
# NodeAddr is the node's hostname on most clusters and its IP where Slurm was told one
MASTER_ADDR="$(scontrol show node "$head_node" -o | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')"
export MASTER_ADDR="${MASTER_ADDR:-$head_node}"
export MASTER_PORT="${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"
nproc="$(lmf_nproc_per_node)"

# The run dir is keyed by job id: a requeued job (same id) finds its checkpoints and resumes.
args=()
run_dir="$(lmf_override_value run.dir "$@")"
if [[ -z "$run_dir" ]]; then
  run_dir="${RUN_DIR:-$SLURM_SUBMIT_DIR/runs/slurm-$SLURM_JOB_ID}"
  args+=("run.dir=$run_dir")
fi
lmf_has_override resume "$@" || args+=(resume=auto)
[[ "$LMF_LAUNCHER" == deepspeed ]] && ! lmf_has_override strategy "$@" && args+=(strategy=zero3)
mkdir -p "$run_dir"

echo "lmforge: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) $LMF_LAUNCHER on $nnodes node(s) [${nodes[*]}]" \
     "x $nproc rank(s), rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $run_dir"

if [[ "$LMF_LAUNCHER" == torchrun ]]; then
  read -r -a torchrun_extra <<<"${TORCHRUN_ARGS:-}"
  launcher=("$LMF_PYTHON" -m torch.distributed.run --nnodes="$nnodes" --nproc_per_node="$nproc"
            --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID"
            "${torchrun_extra[@]}")
  # Node 0 hosts the rendezvous store, and each node advertises its own NodeAddr to the others
  # (named explicitly: a node's hostname need not resolve to the address Slurm reaches it at).
  per_node='addr="$(scontrol show node "$SLURMD_NODENAME" -o | sed -n "s/.* NodeAddr=\([^ ]*\).*/\1/p")"
    exec "$@" --local_addr="${addr:-$(hostname)}" \
      --rdzv_conf="is_host=$(( SLURM_NODEID == 0 ))" -m train "${train_args[@]}"'
else
  hostfile="$run_dir/hostfile"
  for n in "${nodes[@]}"; do echo "$n slots=$nproc"; done >"$hostfile"
  world_info="$("$LMF_PYTHON" - "$hostfile" <<'PY'
import sys
from deepspeed.launcher.runner import encode_world_info, fetch_hostfile
pool = fetch_hostfile(sys.argv[1])
print(encode_world_info({host: list(range(slots)) for host, slots in pool.items()}))
PY
)"
  launcher=("$LMF_PYTHON" -u -m deepspeed.launcher.launch --world_info="$world_info"
            --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --no_local_rank)
  per_node='exec "$@" --node_rank="$SLURM_NODEID" --module train "${train_args[@]}"'
fi
# The Hydra overrides reach every node through a file in the (shared) run dir, one per line, so
# that any quoting survives; the per-node options go between the launcher and `-m train`.
export LMF_TRAIN_ARGS_FILE="$run_dir/.overrides-$SLURM_JOB_ID"
printf '%s\n' "${args[@]}" "$@" >"$LMF_TRAIN_ARGS_FILE"
per_node='mapfile -t train_args <"$LMF_TRAIN_ARGS_FILE"; '"$per_node"

# All CPUs of the node go to the one task per node (it runs every rank there).
srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
     --kill-on-bad-exit=1 bash -c "$per_node" lmforge-node "${launcher[@]}" &
srun_pid=$!

# Name the nodes of this job that Slurm sees as down (or, with "probe", that refuse a job step),
# with the training ranks they ran: node i runs ranks i*nproc .. (i+1)*nproc-1.
lmf_report_lost_nodes() {
  local i state first last ranks lost
  for i in "${!nodes[@]}"; do
    state="$(scontrol show node "${nodes[$i]}" -o 2>/dev/null | sed -n 's/.* State=\([^ ]*\).*/\1/p')"
    lost=0
    [[ "$state" =~ DOWN|NOT_RESPONDING|FAIL|\* ]] && lost=1
    if (( ! lost )) && [[ "${1:-}" == probe ]]; then
      timeout 30 srun --overlap --nodes=1 --ntasks=1 --nodelist="${nodes[$i]}" true >/dev/null 2>&1 || lost=1
    fi
    if (( lost )); then
      first=$(( i * nproc )) last=$(( (i + 1) * nproc - 1 ))
      ranks="rank $first"; (( last > first )) && ranks="ranks $first-$last"
      echo "lmforge: error: lost node ${nodes[$i]} (node rank $i, training $ranks; Slurm state ${state:-unknown})" >&2
    fi
  done
}

preempted=0
on_signal() {
  [[ "$1" == USR1 ]] && preempted=1
  # a node failure ends the job with SIGTERM: say which node (and ranks) went away
  [[ "$1" == TERM ]] && (( nnodes > 1 )) && lmf_report_lost_nodes
  echo "lmforge: SIG$1 at $(date -u +%FT%T.%3NZ): forwarding SIGTERM so the trainer checkpoints and exits"
  # every job step, not this batch shell
  scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || kill -TERM "$srun_pid" 2>/dev/null || true
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

rc=0
while true; do
  wait "$srun_pid" && rc=0 || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break   # wait also returns when a trapped signal arrives
done
rm -f "$LMF_TRAIN_ARGS_FILE"
echo "lmforge: training step ended with exit code $rc at $(date -u +%FT%T.%3NZ)"
if (( rc != 0 && ! preempted && nnodes > 1 )); then
  # A surviving rank only sees a broken connection: probe each node's slurmd with a trivial step
  # (refused at once by a dead node) to name the lost node and its training ranks.
  lmf_report_lost_nodes probe
fi
if (( preempted )); then
  echo "lmforge: requeueing job $SLURM_JOB_ID; it resumes from $run_dir/checkpoints"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
