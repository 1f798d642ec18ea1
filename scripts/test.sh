#!/usr/bin/env bash
# Set up (as scripts/setup.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
set +e
.venv/bin/python -m pytest -ra "$@"
code=$?
# pytest exits 5 when it collected no test: that is a failure here, not a pass.
[ $code -eq 5 ] && echo "no tests were collected" >&2 && exit 1
exit $code
