#!/usr/bin/env bash
# One device call of the Ray GPU proof (docs/gpu.md, "Ray Train workers"), from the repository root
# with the wheels of `bench/gpu/wheels.sh --ray` in .whl/: installs them unless this machine has them,
# then runs the steps named on the command line; results under $OUT.
#   examples    optimenv run of examples/fsdp2-gpu.yaml and zero3-gpu.yaml, 1 worker, 30 steps
#   ray-launch  optimenv ray-launch of bench/gpu/train.py with the ZeRO-3 spec (optimenv spec)
#   bench=NAME  run.py --launcher ray, FSDP2 and ZeRO-3 alternating, until the call's time is up
# BENCH_ARGS adds run.py options; CALL_S is the call's limit (default 590 s).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/ray-gpu-out}
mkdir -p "$OUT"
log=$OUT/console.log
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [[ ! -d /tmp/site/ray ]]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >>"$log" 2>&1
fi
python3 -c 'import ray, torch, accelerate, deepspeed, optimenv; print("versions", ray.__version__,
  torch.__version__, accelerate.__version__, deepspeed.__version__, torch.cuda.get_device_name())' 2>>"$log"
cli() { python3 -m optimenv.cli "$@"; }
for step in "$@"; do
  echo "== $step (${SECONDS}s)" | tee -a "$log"
  case $step in
    examples)
      for name in fsdp2-gpu zero3-gpu; do
        cli run "examples/$name.yaml" --workers 1 --steps 30 -o json >"$OUT/run-$name.json" 2>>"$log"
        echo "$name: exit $?"; tail -n 3 "$log"
      done ;;
    ray-launch)
      cli spec bench/gpu/configs/zero3.yaml -o /tmp/z3 --nodes 1 --gpus-per-node 1 2>>"$log"
      cli ray-launch --spec /tmp/z3/spec.json --workers 1 --report "$OUT/ray-launch.json" -- \
        bench/gpu/train.py --out-dir /tmp/rl --steps 10 --warmup 2 --micro-batch 8 --label ray-launch 2>>"$log"
      echo "ray-launch: exit $?"
      cp /tmp/rl/rank0.json "$OUT/ray-launch-rank0.json" 2>/dev/null ;;
    bench=*)
      left=$(( ${CALL_S:-590} - SECONDS - 20 ))
      # shellcheck disable=SC2086
      python3 bench/gpu/run.py --launcher ray --gpus 1 --scenarios fsdp2,zero3 --reps 12 --micro-batch 32 \
        --steps 25 --warmup 5 --deadline-s "$left" --work /tmp/ray-bench --out "$OUT/${step#bench=}" \
        ${BENCH_ARGS:-} 2>>"$log" | tail -n 12 ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
