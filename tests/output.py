"""A child process's output, read on a thread, so that every wait for a line
has a deadline: a job that stops printing fails its test instead of hanging CI."""
from __future__ import annotations

import queue
import subprocess
import threading
import time
from typing import Callable

import pytest

_END = object()


class Lines:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(_END)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str:
        """The first line (from here on) that satisfies predicate, within timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no expected line within {timeout:.0f}s; the output so far:\n{self.text()[-3000:]}")
            if line is _END:
                pytest.fail(f"the output ended before the expected line:\n{self.text()[-3000:]}")
            self.lines.append(line)
            if predicate(line):
                return line

    def wait_for_text(self, marker: str, timeout: float) -> str:
        return self.wait_for(lambda line: marker in line, timeout)

    def finish(self, timeout: float) -> str:
        """Wait for the process to exit (killing it after timeout seconds, which fails
        the test) and return all of its output."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._reader.join(10)
            self._drain()
            pytest.fail(f"still running {timeout:.0f}s later; the output:\n{self.text()[-3000:]}")
        self._reader.join(30)
        self._drain()
        return self.text()

    def _drain(self) -> None:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is not _END:
                self.lines.append(line)
