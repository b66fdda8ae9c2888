#!/usr/bin/env bash
# The GPU check of issue 21, one command, one table (see benchmarks/gpu_check.py for the rows and settings):
#
#   bash benchmarks/gpu_check.sh                       # on a machine with one CUDA GPU (target: < 8 min on an H100)
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # tiny sizes on CPU (the slow test runs this)
#
# Python: ATLASVI_PYTHON, else the repo's .venv (its torch must be a CUDA build on the GPU machine).
# The scvi-tools row runs benchmarks/.cache/scvi-venv (bash benchmarks/setup_scvi_venv.sh). That script installs a
# CPU torch where pip finds a "+cpu" wheel; for the GPU row its torch must be a CUDA build, e.g.
#   benchmarks/.cache/scvi-venv/bin/pip install --force-reinstall "torch==$(benchmarks/.cache/scvi-venv/bin/python \
#       -c 'import torch; print(torch.__version__.split("+")[0])')" --index-url https://download.pytorch.org/whl/cu126
# (or set up the venv on the GPU machine where pip's only torch is PyPI's Linux wheel, a CUDA build). Without a CUDA
# torch there the scvi-tools row says so and the rest of the table still runs.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="${ATLASVI_PYTHON:-$REPO/.venv/bin/python}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=PASSIVE
cd "$REPO"
exec "$PYTHON" "$HERE/gpu_check.py" "$@"
