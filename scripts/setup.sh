#!/usr/bin/env bash
# Set up everything on a fresh Debian 12 machine (as root, with Python 3.11, gcc, cmake):
# system packages, a virtualenv in .venv, torch 2.13.0 (CPU), tensorflow-cpu 2.21.0 (Keras 3),
# hvdtrain, and Horovod built by hvdtrain's own build for both frameworks (7 to 10 minutes
# on 2 cores the first time; cached in ~/.cache/hvdtrain, so a rerun takes seconds).
#   scripts/setup.sh          set up only
#   scripts/setup.sh --demo   set up, then train examples/digits-mlp-torch.yaml on 2 processes
# On a GPU machine (nvidia-smi lists a GPU) it installs the CUDA builds instead (torch's
# PyPI wheel, tensorflow[and-cuda]; a CUDA build of torch already in $PYTHON is kept), and
# the Horovod build adds NCCL GPU operations by itself (CUDA's nvcc, NCCL from NVIDIA's
# pip package). Settings:
#   HVDTRAIN_FRAMEWORKS=torch     one framework only (default: torch,tensorflow)
#   HVDTRAIN_WHEELS=DIR           install from the wheels in DIR only (no package index;
#                                 DIR holds setuptools too, and Horovod's sdist
#                                 horovod-0.28.1.tar.gz, which the build takes from there)
#   HVDTRAIN_EXTRAS=tensorboard   hvdtrain's other extras (default: tensorboard; scripts/test.sh
#                                 adds test)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mpicc >/dev/null || need_apt+=(openmpi-bin libopenmpi-dev)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++)
if [ ${#need_apt[@]} -gt 0 ] && [ -z "${HVDTRAIN_WHEELS:-}" ]; then
  echo "== installing system packages: ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
frameworks=",${HVDTRAIN_FRAMEWORKS:-torch,tensorflow},"
gpu=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then gpu=1; fi
# a CUDA build of torch already in $PYTHON (a GPU image's) is kept: .venv sees its packages
machine_site=
if [ $gpu = 1 ] && "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  machine_site=$("$PYTHON" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
fi
pip_from=()
# offline: no index, and hvdtrain built with the setuptools at hand (in DIR or the machine's)
[ -n "${HVDTRAIN_WHEELS:-}" ] && pip_from=(--no-index --find-links "$HVDTRAIN_WHEELS" --no-build-isolation)

extras=${HVDTRAIN_EXTRAS-tensorboard}
case $frameworks in *,torch,*) [ -n "$machine_site" ] || extras+=",torch" ;; esac
case $frameworks in *,tensorflow,*) if [ $gpu = 1 ]; then extras+=",tensorflow-cuda"; else extras+=",tensorflow"; fi ;; esac
extras=${extras#,}

[ -x .venv/bin/python ] || { echo "== creating .venv"; "$PYTHON" -m venv .venv; }
# setuptools in .venv itself: Horovod's build imports distutils from it (Python >= 3.12)
if [ ${#pip_from[@]} -gt 0 ]; then
  .venv/bin/python -m pip install -q "${pip_from[@]}" --ignore-installed --no-deps setuptools
else
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
fi
if [ -n "$machine_site" ]; then
  echo "== using the machine's CUDA build of torch from $machine_site"
  echo "$machine_site" > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/hvdtrain-machine-site.pth"
fi
if [ $gpu = 1 ]; then
  echo "== GPU machine: installing hvdtrain [$extras] (CUDA builds)"
else
  echo "== installing torch 2.13.0 (CPU), tensorflow-cpu 2.21.0 and hvdtrain: [$extras]"
fi
target=.
[ -z "$extras" ] || target=".[$extras]"
.venv/bin/python -m pip install -q "${pip_from[@]}" -e "$target"
case $frameworks in *,tensorflow,*)
  # Keras 2 for old Horovod scripts (entry.keras: 2). --no-deps: tf-keras asks for the
  # `tensorflow` distribution, which would install TensorFlow's CUDA build over tensorflow-cpu.
  keras2=$(.venv/bin/python -c "from hvdtrain.backends import KERAS2_PACKAGE; print(KERAS2_PACKAGE)")
  echo "== $keras2 (Keras 2, for entry.keras: 2)"
  .venv/bin/python -m pip install -q "${pip_from[@]}" --no-deps "$keras2" ;;
esac
echo "== Horovod"
.venv/bin/hvdtrain build-horovod
for framework in torch tensorflow; do
  case $frameworks in *,$framework,*) ;; *) continue ;; esac
  TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -c "import horovod.$framework as hvd; assert hvd.gloo_built(), 'Horovod for $framework built without Gloo'"
  if [ $gpu = 1 ]; then
    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -c "import horovod.$framework as hvd; assert hvd.nccl_built(), 'Horovod for $framework built without NCCL'"
  fi
done

if [ "${1:-}" = "--demo" ]; then
  echo "== training examples/digits-mlp-torch.yaml on 2 processes"
  .venv/bin/hvdtrain run examples/digits-mlp-torch.yaml -np 2
fi
