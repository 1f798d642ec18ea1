"""TensorFlow's start-up notices, kept out of the user's terminal.

TensorFlow 2.21 writes some notices from C++ before its log level applies:
absl prints everything logged before `absl::InitializeLog` to stderr, whatever
TF_CPP_MIN_LOG_LEVEL says. Which ones appear depends on the CPU (the oneDNN
notice shows on CPUs where TensorFlow turns oneDNN on by default, such as
recent Intel Xeons). So the import runs with the process's stderr (file
descriptor 2) caught, and what it wrote is passed on without these notices.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Iterator

START_UP_NOTICES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|\] oneDNN custom operations are on"
    r"|cpu_feature_guard\.cc"
    r"|^To enable the following instructions:")


def hidden(level_variable: str = "TF_CPP_MIN_LOG_LEVEL") -> bool:
    """Hide notices unless the user asked for TensorFlow's info messages (level 0)."""
    return os.environ.get(level_variable, "2").strip() not in ("0", "")


@contextlib.contextmanager
def start_up_notices_hidden() -> Iterator[None]:
    """Run the block with fd 2 caught; afterwards write back every line it wrote
    except TensorFlow's start-up notices (all of it when they are not hidden)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            text = caught.read().decode(errors="replace")
            keep = [line for line in text.splitlines(keepends=True)
                    if not (hidden() and START_UP_NOTICES.search(line))]
            if keep:
                os.write(2, "".join(keep).encode())
