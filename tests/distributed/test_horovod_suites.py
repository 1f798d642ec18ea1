"""Horovod's own test suites (upstream test/parallel) on 2 Gloo ranks against the
installed build, through scripts/horovod_suites.py: on every rank, each failure
is one of tests/horovod_known_failures.yaml failing with its stated error, each
listed test fails, the passed and skipped counts are the expected ones, and
every exit code agrees (the gate's own judgement is tested in
tests/unit/test_horovod_suites_gate.py)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.distributed
sys.path.insert(0, str(ROOT / "scripts"))
import horovod_suites  # noqa: E402

FOUND = horovod_suites.find_suites()


@pytest.mark.parametrize("suite", horovod_suites.SUITES)
def test_horovod_suite_runs_as_expected_on_every_rank(suite, tmp_path, figure):
    if FOUND is None:
        message = ("Horovod's suites not found (HVDTRAIN_HOROVOD_SUITES, or shared/upstream/horovod-test "
                   "beside the checkout or a parent)")
        if os.environ.get("HVDTRAIN_REQUIRE_SUITES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "horovod_suites.py"), suite,
                             "--suites-dir", str(FOUND), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=2400)
    figure(f"Horovod suite {result.stdout.splitlines()[0] if result.stdout else result.stderr[-300:]}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    [summary] = json.loads((tmp_path / "summary.json").read_text())
    expected = horovod_suites.expectations()[suite]
    assert summary["problems"] == []
    assert summary["counts"] == [{"passed": expected["passed"], "skipped": expected["skipped"],
                                  "failed": len(expected.get("failures") or {})}] * 2
