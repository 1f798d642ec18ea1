#!/usr/bin/env bash
# Set up everything on a fresh Debian 12 machine (as root, with Python 3.11, gcc, cmake):
# system packages, a virtualenv in .venv, torch 2.13.0 (CPU), tensorflow-cpu 2.21.0 (Keras 3),
# hvdtrain, and Horovod built by hvdtrain's own build for both frameworks (7 to 10 minutes
# on 2 cores the first time; cached in ~/.cache/hvdtrain, so a rerun takes seconds).
#   scripts/setup.sh          set up only
#   scripts/setup.sh --demo   set up, then train examples/digits-mlp-torch.yaml on 2 processes
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mpicc >/dev/null || need_apt+=(openmpi-bin libopenmpi-dev)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing system packages: ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || { echo "== creating .venv"; "$PYTHON" -m venv .venv; }
echo "== installing torch 2.13.0 (CPU), tensorflow-cpu 2.21.0 and hvdtrain"
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -e ".[torch,tensorflow,tensorboard,test]"
echo "== Horovod"
.venv/bin/hvdtrain build-horovod
for framework in torch tensorflow; do
  TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -c "import horovod.$framework as hvd; assert hvd.gloo_built(), 'Horovod for $framework built without Gloo'"
done

if [ "${1:-}" = "--demo" ]; then
  echo "== training examples/digits-mlp-torch.yaml on 2 processes"
  .venv/bin/hvdtrain run examples/digits-mlp-torch.yaml -np 2
fi
