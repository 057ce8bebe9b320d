#!/usr/bin/env bash
# The GPU figures of docs/performance.md in a few device calls (each under the 10-minute limit).
# Build the wheels once here (bash ../shared/gpu/wheels.sh), then on the GPU machine, carrying .whl:
#   bash benchmarks/gpu_figures.sh tests    # pytest -m gpu: bf16 fsdp/zero3 == single on NCCL, 40B-width step
#   bash benchmarks/gpu_figures.sh gpt2     # gpt2-124m bf16 compile: train.bench + vs transformers
#   bash benchmarks/gpu_figures.sh wide     # falcon-40b-width block stack under fsdp and zero3
#   bash benchmarks/gpu_figures.sh plan     # plan vs CUDA max allocated
#   bash benchmarks/gpu_figures.sh all      # the four in one call, most wanted first: gpt2, wide, tests,
#                                           # plan; each capped at PART_TIMEOUT seconds (default 150)
# Each part writes <part>.log (and JSON where the tool prints it) under ./gpu-figures. Under the device
# tool ($OUT set; it returns at most 8 files) they are written to /tmp/gpu-figures and come back as one
# $OUT/gpu_figures.tgz plus $OUT/summary.txt, even when the call is cut short.
# A session's device time is short (15 min, machine start included): prefer one `all` call, e.g.
#   run(command="bash benchmarks/gpu_figures.sh all", carry=[".whl"], timeout_s=600)
set -uo pipefail
part=${1:?usage: gpu_figures.sh tests|gpt2|wide|plan|all}
if [ -n "${OUT:-}" ]; then
  out=/tmp/gpu-figures
  trap 'tar -czf "$OUT/gpu_figures.tgz" -C "$out" . ; cp "$out/summary.txt" "$OUT/" 2>/dev/null' EXIT
else
  out=gpu-figures
fi
mkdir -p "$out"
if [ -d .whl ] && ! python3 -c "import hydra, deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

bench() {  # name, overrides...
  local name=$1; shift
  $py -m train.bench "$@" >"$out/$name.json" 2>"$out/$name.log"; echo "$name rc=$?" | tee -a "$out/summary.txt"
  tail -n 25 "$out/$name.log"
}

part_tests() {
  $py -m pytest -q -m gpu -s tests 2>&1 | tee "$out/tests.log" | tail -n 40
}
part_gpt2() {
  bench gpt2_bf16_compile model=gpt2-124m precision=bf16 train.device=cuda train.compile=true \
    train.micro_batch_size=16 train.seq_len=1024 bench.steps=20 bench.warmup=5
  bench gpt2_bf16_eager model=gpt2-124m precision=bf16 train.device=cuda \
    train.micro_batch_size=16 train.seq_len=1024 bench.steps=20 bench.warmup=3
  $py benchmarks/vs_transformers.py --device cuda --precision bf16 --compile --batch 16 --seq-len 1024 \
    --steps 20 --warmup 5 2>"$out/vs_transformers.err" | tee "$out/vs_transformers.log"
}
part_wide() {
  # 4 Falcon-40B blocks at full width (d=8192, 128 q / 8 kv heads, ffn 32768), seq 2048, bf16; a small
  # vocabulary so the figure is the blocks'. World size 1 on NCCL: the sharded code paths, one GPU.
  for s in fsdp zero3; do
    for ac in none full; do
      bench "wide_${s}_ac_${ac}" model=falcon-40b model.n_layer=4 model.vocab_size=128 strategy=$s \
        precision=bf16 train.device=cuda train.activation_checkpointing=$ac train.micro_batch_size=2 \
        train.seq_len=2048 bench.steps=8 bench.warmup=3
    done
  done
}
part_plan() {
  $py benchmarks/plan_vs_measured.py --device cuda 2>&1 | tee "$out/plan.log" | tail -n 20
}

case $part in
  tests|gpt2|wide|plan) "part_$part" ;;
  all)
    # each part in its own process group under a cap, so one slow part cannot eat the others' time
    export -f part_tests part_gpt2 part_wide part_plan bench
    export out py
    for p in gpt2 wide tests plan; do
      start=$(date +%s)
      timeout -k 10 "${PART_TIMEOUT:-150}" bash -c "part_$p"
      echo "part $p rc=$? in $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
    done ;;
  *) echo "unknown part $part (tests|gpt2|wide|plan|all)"; exit 2 ;;
esac
