import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def hvdtrain(*args, cwd=None, timeout=600, env=None):
    """Run the real CLI in a subprocess, as a user would."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "hvdtrain", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for a server a test starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def missing(reason: str):
    """Skip a test whose prerequisite is missing; under CI (HVDTRAIN_CI=1, set by
    .ci/run, where scripts/setup.sh installs everything) fail it instead."""
    if os.environ.get("HVDTRAIN_CI") == "1":
        pytest.fail(f"HVDTRAIN_CI=1 but {reason}")
    pytest.skip(reason)


def require_module(name: str):
    """pytest.importorskip, except that under CI a module that fails to import fails the test."""
    try:
        return __import__(name)
    except ImportError as error:
        missing(f"{name} does not import: {error}")


@pytest.fixture
def cli():
    return hvdtrain


FIGURES: list[str] = []


@pytest.fixture
def figure():
    """Record a measured figure (time to exit, accuracy, job id); every one is
    printed in a section at the end of the run, so the CI log shows them."""
    return FIGURES.append


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("measured figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
