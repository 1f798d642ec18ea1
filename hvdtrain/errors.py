"""Errors the user can act on: shown as a short message, never a traceback."""
from __future__ import annotations

# Exit codes shared by every verb.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PEER = 3  # a rank that stopped because another rank failed: the launcher names the other


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


class TrainingError(Exception):
    """Training went wrong in a way the message explains (e.g. ranks diverged); exits EXIT_FAILED."""
