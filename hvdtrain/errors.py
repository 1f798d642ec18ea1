"""Errors the user can act on: shown as a short message, never a traceback."""
from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path

# Exit codes shared by every verb.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PEER = 3  # a rank that stopped because another rank failed: the launcher names the other
EXIT_HUNG = 4  # the watchdog ended the job: a rank made no progress for horovod.hang_seconds
EXIT_WRITE = 74  # EX_IOERR: a file could not be written (disk full, quota, read-only); nothing else failed


class UserError(Exception):
    """Bad input or environment, explained in the message; exits EXIT_USAGE."""


class SpecError(UserError):
    """Every problem found in one spec, each with its key path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        count = f"{len(problems)} error{'s' if len(problems) != 1 else ''}"
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: invalid spec ({count}):\n{lines}")


class DataError(UserError):
    """The data a spec names cannot be read or used."""


class WriteError(Exception):
    """A file of the run could not be written; the message names it and what was kept. Exits EXIT_WRITE."""


# what a full disk, a quota, a read-only mount or a file size limit raise
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


@contextmanager
def writing(path: Path | str):
    """A write failure inside (disk full, ...) as a WriteError naming `path`."""
    try:
        yield
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        raise WriteError(f"could not write {path}: {err.strerror}") from None


class TrainingError(Exception):
    """Training went wrong in a way the message explains (e.g. ranks diverged); exits EXIT_FAILED."""
