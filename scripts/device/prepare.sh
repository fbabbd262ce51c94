#!/usr/bin/env bash
# Before a GPU call: put what the GPU machine lacks into .gpu/ (git-ignored), which the call carries.
#
#   bash scripts/device/prepare.sh SHARED     # SHARED: the folder holding wheels/ and data/ (see below)
#
# SHARED/device/wheels/*.whl: hydra-core, omegaconf, antlr4 (pure Python; the machine has torch, triton,
# pytest, pytest-xdist). SHARED/data: MNIST/raw, cifar10-jpeg, imagenette-mini are copied (about 37 MB;
# a call carries at most 64 MiB with the checkout); Fashion-MNIST (30 MB) does not fit beside them, so
# gpu_check.sh deselects its two tests there (CI runs them).
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${1:?usage: prepare.sh SHARED (the folder holding device/wheels and data)}
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/data
cp "$SHARED"/device/wheels/*.whl .gpu/wheels/
for d in MNIST cifar10-jpeg imagenette-mini; do
  cp -r "$SHARED/data/$d" .gpu/data/
done
chmod -R u+w .gpu
du -sh .gpu
echo 'carry: [".gpu"]'
