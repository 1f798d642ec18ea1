#!/usr/bin/env bash
# Set up (as scripts/setup.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# the tests' own packages besides the job's (pytest, hypothesis, the schemas, webdataset, mkdocs)
HVDTRAIN_EXTRAS="${HVDTRAIN_EXTRAS-tensorboard},test" scripts/setup.sh
# The cluster tests start a throwaway Slurm cluster from Debian's packages (root only).
# The two-host tests start sshd in network namespaces (openssh-server).
if [ "$(id -u)" = 0 ] && { ! command -v slurmctld >/dev/null || [ ! -x /usr/sbin/sshd ]; }; then
  echo "== installing slurm-wlm, munge and openssh-server for the cluster tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge openssh-server >/dev/null
fi
# The manifest tests scan the rendered pods with checkov, a policy scanner whose pins clash
# with pytest's (packaging < 24): it gets a virtualenv of its own.
if [ ! -x .venv-tools/bin/checkov ]; then
  echo "== installing checkov (Kubernetes policy scanner) in .venv-tools"
  python3 -m venv .venv-tools && .venv-tools/bin/pip install -q ${HVDTRAIN_WHEELS:+--no-index --find-links "$HVDTRAIN_WHEELS"} "checkov==3.3.30"
fi
set +e
.venv/bin/python -m pytest -ra "$@"
code=$?
# pytest exits 5 when it collected no test: that is a failure here, not a pass.
[ $code -eq 5 ] && echo "no tests were collected" >&2 && exit 1
exit $code
