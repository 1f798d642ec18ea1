"""Two gloo ranks under horovodrun, each running pytest on the rank checks
(Horovod's own CI pattern)."""
import subprocess
import sys
from pathlib import Path

import pytest

from hvdtrain.launch.local import horovodrun_path

pytestmark = pytest.mark.distributed
CHECKS = Path(__file__).parent / "ranks" / "torch_rank_checks.py"


def test_two_ranks_pass_rank_checks(tmp_path):
    result = subprocess.run(
        [horovodrun_path(), "-np", "2", "-H", "localhost:2", "--gloo",
         sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CHECKS)],
        capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "HVDTRAIN_TEST_OUT": str(tmp_path), "OMP_NUM_THREADS": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert output.count("2 passed") == 2, output[-4000:]  # both ranks ran both checks
