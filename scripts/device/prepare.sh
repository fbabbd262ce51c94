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
# what the suite needs there beyond SHARED's wheels (pure Python, from the package registry): setuptools
# (tests/test_readme.py builds the wheel offline), the
# local_parallel (joblib) and submitit launchers, and the Optuna sweeper's plugin, which composes the
# tune_bc_mnist preset; Optuna itself needs scipy (35 MB, more than a call carries): the tests that run
# an Optuna study skip without it (CI runs them)
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels joblib==1.6.0 cloudpickle==3.1.3 \
  submitit==1.5.4 hydra-submitit-launcher==1.2.0 hydra-optuna-sweeper==1.3.0 setuptools==84.2.1
for d in MNIST cifar10-jpeg imagenette-mini; do
  cp -r "$SHARED/data/$d" .gpu/data/
done
chmod -R u+w .gpu
du -sh .gpu
echo 'carry: [".gpu"]'
