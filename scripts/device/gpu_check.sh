#!/usr/bin/env bash
# The GPU checks of issue 25 as two prepared calls of the device tool (each under 600 s; run the second
# within the machine's idle window so it stays warm):
#
#   bash scripts/device/gpu_check.sh bench    # environment, bench_weight (steps, kernel), bench_seeds, bench_vgg;
#                                             # then bench_compile's CUDA-graph ratios if BUDGET leaves time
#   bash scripts/device/gpu_check.sh suite    # the whole test suite with tests/test_cuda*.py (16 cores: ~5 min)
#
# A session has 15 minutes of device time for everything, the machine's start included (1-2 min): bench's
# default BUDGET (330 s) leaves the suite about 7 minutes. The second call must follow within the idle
# window (status's idle_release_s) or it starts a fresh machine.
#
# Run scripts/device/prepare.sh first (it fills .gpu/, carried with carry: [".gpu"]). Each stage writes its
# log to a scratch folder and $OUT/gpu_check-<what>.tar.gz is re-packed after every stage, so a call cut
# short still returns what finished (a running stage's log is re-packed every 20 s too).
#
# BUDGET (seconds; default 330 for bench, 580 for suite) is the time this call may take: each stage's limit is cut to what is left of
# it, so a stage ends under its own `timeout` (and its log is packed) before the device tool kills the call.
# Set it from the run's limit, e.g. the second call with less device time left than 600 s:
#   BUDGET=$((budget_left_s - 20)) bash scripts/device/gpu_check.sh suite
# GPU_CHECK_DEVICE=cpu rehearses the same stages on a CPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
WHAT=${1:-bench}
if [ "$WHAT" = bench ]; then BUDGET=${BUDGET:-330}; else BUDGET=${BUDGET:-580}; fi
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
SCRATCH=$(mktemp -d)
LOGS=$SCRATCH/logs
mkdir -p "$LOGS"

pack() {  # into the scratch folder first, then one move: $OUT never holds a half-written tarball
  tar -czf "$SCRATCH/pack.$BASHPID.tar.gz" -C "$SCRATCH" logs && mv -f "$SCRATCH/pack.$BASHPID.tar.gz" "$OUT/gpu_check-$WHAT.tar.gz"
}

stage() {  # stage NAME LIMIT_S COMMAND...: run it under a time limit (cut to what BUDGET leaves), log it, pack
  local name=$1 limit=$2 t0=$SECONDS rc packer left
  shift 2
  left=$((BUDGET - SECONDS - 15))  # SECONDS: since the script started; 15 s for timeout's kill-after and a pack
  if [ "$left" -lt 10 ]; then
    echo "== $name: skipped, ${left} s left of BUDGET=$BUDGET" | tee -a "$LOGS/stages.txt"
    pack
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (limit ${limit} s): $*" | tee -a "$LOGS/stages.txt"
  (  # re-pack every 20 s; TERM stops it between packs, never half-way through one
    s=''
    trap '[ -n "$s" ] && kill "$s" 2>/dev/null; exit 0' TERM
    while :; do sleep 20 & s=$!; wait "$s"; pack; done
  ) &
  packer=$!
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  kill "$packer" 2>/dev/null
  wait "$packer" 2>/dev/null
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOGS/stages.txt"
  tail -n 25 "$LOGS/$name.log"
  pack
}

# ---- set-up: the hydra wheels, qexp importable from the checkout, its configs, a `qexp` command ------------
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .gpu/wheels/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export QEXP_DATA=${QEXP_DATA:-$PWD/.gpu/data} QEXP_CACHE=$SCRATCH/cache
if [ ! -e qexp/configs ]; then  # what the wheel's package-dir mapping does; removed on exit (a rehearsal's
  ln -s ../configs qexp/configs  # checkout stays clean)
  trap 'rm -f qexp/configs' EXIT
fi
mkdir -p /tmp/site/bin
printf '#!/bin/sh\nexec %s -m qexp.cli "$@"\n' "$PY" > /tmp/site/bin/qexp
chmod +x /tmp/site/bin/qexp
export PATH=/tmp/site/bin:$PATH

stage env 60 bash -c "date -u; nvidia-smi || true; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0)); import qexp.configs; print(qexp.configs.__file__); import joblib, submitit, hydra_plugins.hydra_joblib_launcher, hydra_plugins.hydra_optuna_sweeper'; nproc; free -g"

case $WHAT in
  bench)
    # eager step ratios and the SR kernel (the launch counts are the same on any machine: not re-run here)
    stage bench_weight 90 "$PY" scripts/bench_weight.py --part steps --device "$DEVICE" --rounds 7
    stage bench_kernel 60 "$PY" scripts/bench_weight.py --part kernel --device "$DEVICE" --rounds 7
    stage bench_seeds 60 "$PY" scripts/bench_seeds.py --device "$DEVICE" --k 8 --images 10000 --rounds 3
    stage bench_vgg 60 "$PY" scripts/bench_vgg.py --device "$DEVICE" --images "${VGG_IMAGES:-10000}" --rounds 4
    # last (what BUDGET leaves): compile=true cuda_graphs=true step ratios, the route for ste and lsq; each
    # model compiles its 6 methods cold first (one line per compiled method, then the model's tables)
    stage bench_graphs_lenet5 150 "$PY" scripts/bench_compile.py --device "$DEVICE" --modes eager,graphs \
      --methods float,bc,sr,r,ste,lsq --models lenet5 --rounds 5
    stage bench_graphs_resnet20 150 "$PY" scripts/bench_compile.py --device "$DEVICE" --modes eager,graphs \
      --methods float,bc,sr,r,ste,lsq --models resnet20 --rounds 5
    ;;
  suite)  # tests/test_cuda*.py and the rest (pinned to the CPU by tests/conftest.py) in one run
    stage suite "${SUITE_LIMIT:-520}" "$PY" -m pytest -p no:cacheprovider -n "${WORKERS:-14}" -v --tb=short -rfE \
      -k "not fashion_mnist" ${SUITE_ARGS:-}
    ;;
  *) echo "gpu_check.sh: unknown stage set '$WHAT' (bench or suite)" >&2; exit 2 ;;
esac
echo "logs: $OUT/gpu_check-$WHAT.tar.gz"
