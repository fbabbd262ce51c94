#!/usr/bin/env bash
# The GPU checks of issue 25 as two prepared calls of the device tool (each under 600 s; run the second
# within the machine's idle window so it stays warm):
#
#   bash scripts/device/gpu_check.sh bench    # environment, bench_weight, bench_vgg, bench_seeds (~6 min)
#   bash scripts/device/gpu_check.sh suite    # the whole test suite with tests/test_cuda.py (~9 min)
#
# Run scripts/device/prepare.sh first (it fills .gpu/, carried with carry: [".gpu"]). Each stage writes its
# log to a scratch folder and $OUT/gpu_check-<what>.tar.gz is re-packed after every stage, so a call cut
# short still returns what finished. GPU_CHECK_DEVICE=cpu rehearses the same stages on a CPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
WHAT=${1:-bench}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
SCRATCH=$(mktemp -d)
LOGS=$SCRATCH/logs
mkdir -p "$LOGS"

pack() { tar -czf "$OUT/gpu_check-$WHAT.tar.gz" -C "$SCRATCH" logs; }

stage() {  # stage NAME LIMIT_S COMMAND...: run it under a time limit, log it, pack the logs
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit} s): $*" | tee -a "$LOGS/stages.txt"
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
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
[ -e qexp/configs ] || ln -s ../configs qexp/configs   # what the wheel's package-dir mapping does
mkdir -p /tmp/site/bin
printf '#!/bin/sh\nexec %s -m qexp.cli "$@"\n' "$PY" > /tmp/site/bin/qexp
chmod +x /tmp/site/bin/qexp
export PATH=/tmp/site/bin:$PATH

stage env 60 bash -c "date -u; nvidia-smi || true; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0)); import qexp.configs; print(qexp.configs.__file__)'; nproc; free -g"

case $WHAT in
  bench)
    stage bench_weight 170 "$PY" scripts/bench_weight.py --device "$DEVICE" --rounds 7
    stage bench_vgg 170 "$PY" scripts/bench_vgg.py --device "$DEVICE" --images "${VGG_IMAGES:-10000}" --rounds 4
    stage bench_seeds 90 "$PY" scripts/bench_seeds.py --device "$DEVICE" --k 8 --rounds 6
    ;;
  suite)  # tests/test_cuda.py and the rest (pinned to the CPU by tests/conftest.py) in one run
    stage suite "${SUITE_LIMIT:-520}" "$PY" -m pytest -p no:cacheprovider -n "${WORKERS:-14}" -v --tb=short -rfE \
      -k "not fashion_mnist" ${SUITE_ARGS:-}
    ;;
  *) echo "gpu_check.sh: unknown stage set '$WHAT' (bench or suite)" >&2; exit 2 ;;
esac
echo "logs: $OUT/gpu_check-$WHAT.tar.gz"
