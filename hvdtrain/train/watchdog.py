"""A watchdog that names a hung rank, with every rank's stack.

Each rank keeps its progress (epoch, step, phase: `progress`) and a thread that
sends it to rank 0 every few seconds over its own TCP connection; rank 0 answers
each heartbeat. The channel is apart from the collectives on purpose: a rank
stuck in an allreduce, a loader or a filesystem still has a thread that talks,
and a rank that cannot talk (stopped, dead, its host gone) is found by its
silence. Only the address, and a per-job token every connection must present,
travel once through a Horovod broadcast when training starts; a connection
without the token is refused and logged.

When a rank's progress has not changed for `horovod.hang_seconds`, rank 0 asks
every rank for the Python stacks of all its threads (`faulthandler`, written by
the rank's heartbeat thread while its main thread is stuck), writes them to
OUTPUT/hang/rank-N.txt, prints one line naming the rank(s) that stopped first
(host, pid, last epoch, step and phase) and ends the job (EXIT_HUNG). A rank
whose rank 0 stops answering for that long ends the job the same way.
"""
from __future__ import annotations

import faulthandler
import hmac
import json
import os
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import EXIT_HUNG
from .contract import Comm

_progress: dict[str, Any] = {"epoch": 0, "step": 0, "phase": "start-up"}
LOADER_STACKS = signal.SIGUSR1  # a loader process (register_loader_stacks) writes its stacks to stderr
LOADER_NAME = "pt_data_worker"  # how torch names its loader processes
NO_STACK = "(no answer: the process is stopped or gone, or its host cannot be reached)\n"


def progress(phase: str, epoch: int | None = None, step: int | None = None) -> None:
    """This rank reached a step (or a phase) of its training."""
    _progress.update(phase=phase, **({"epoch": epoch} if epoch is not None else {}),
                     **({"step": step} if step is not None else {}))


PHASES = ("start-up", "train", "validation", "checkpoint", "finishing")


def position(progress: dict | None) -> tuple[int, int, int]:
    """How far a rank has come: (epoch, step, phase)."""
    progress = progress or {}
    return (progress.get("epoch", 0), progress.get("step", 0),
            PHASES.index(progress["phase"]) if progress.get("phase") in PHASES else 0)


def interval(hang_seconds: float) -> float:
    return max(0.2, min(1.0, hang_seconds / 6))


def own_addresses() -> list[str]:
    """Where the other ranks may reach this host: its name, then every IPv4 address."""
    import psutil
    found = [socket.getfqdn()]
    for addresses in psutil.net_if_addrs().values():
        found += [a.address for a in addresses if a.family == socket.AF_INET]
    return list(dict.fromkeys(found))


class Watchdog:
    """start() on every rank once collectives work; stop() when training ends."""

    def __init__(self, hang_seconds: float, comm: Comm, output: Path):
        self.hang, self.comm, self.output = hang_seconds, comm, Path(output)
        self.every = interval(hang_seconds)
        self.closing = threading.Event()
        self.server: _Server | None = None

    def start(self) -> "Watchdog":
        offer = None
        if self.comm.rank == 0:
            self.server = _Server(self.hang, self.comm.size, self.output, secrets.token_hex(16))
            offer = (own_addresses(), self.server.port, self.server.token)
        addresses, port, token = self.comm.broadcast_object(offer, "hvdtrain.watchdog")
        threading.Thread(target=self._beat, args=(addresses, port, token), daemon=True,
                         name="hvdtrain-heartbeat").start()
        return self

    def stop(self) -> None:
        self.closing.set()
        if self.server is not None:
            self.server.close()

    def _connect(self, addresses: list[str], port: int) -> socket.socket:
        last: OSError | None = None
        for address in addresses:
            try:
                return socket.create_connection((address, port), timeout=5)
            except OSError as err:
                last = err
        raise OSError(f"no address of rank 0 answered ({', '.join(addresses)}): {last}")

    def _beat(self, addresses: list[str], port: int, token: str) -> None:
        """This rank's heartbeat thread: its progress every few seconds; rank 0's requests
        for its stacks; rank 0 silent for hang_seconds ends the job."""
        try:
            conn = self._connect(addresses, port)
        except OSError as err:
            print(f"hvdtrain: watchdog: rank {self.comm.rank} cannot reach rank 0: {err}", file=sys.stderr)
            return
        conn.settimeout(self.hang)
        reader = conn.makefile("r")
        hello = {"token": token, "rank": self.comm.rank, "host": socket.gethostname(), "pid": os.getpid()}
        try:
            conn.sendall((json.dumps(hello) + "\n").encode())
            while not self.closing.is_set():
                conn.sendall((json.dumps(_progress) + "\n").encode())
                answer = reader.readline()
                if not answer:
                    return  # rank 0 closed: the job is ending
                if answer.strip() == "stacks":
                    stacks = own_stacks()
                    conn.sendall((json.dumps({"stacks": stacks, "waiting": in_collective(stacks)}) + "\n").encode())
                    continue
                self.closing.wait(self.every)
            conn.sendall((json.dumps({"phase": "done"}) + "\n").encode())
        except socket.timeout:
            if not self.closing.is_set():
                print(f"hvdtrain: rank 0 (host {addresses[0]}) has not answered rank {self.comm.rank}'s "
                      f"heartbeat for {self.hang:g} s (horovod.hang_seconds): it is stopped, hung with its "
                      f"heartbeat, or its host cannot be reached; ending the job", file=sys.stderr, flush=True)
                os._exit(EXIT_HUNG)
        except OSError:
            return
        finally:
            conn.close()


def in_collective(stacks: str) -> bool:
    """This process's main thread waits in one of Horovod's collectives (for the others)."""
    main = f"Thread 0x{threading.main_thread().ident:016x}"
    block = next((b for b in stacks.split("\n\n") if b.lstrip().startswith((main, "Current " + main[0].lower() + main[1:]))), "")
    return "/horovod/" in block


def own_stacks() -> str:
    """Every thread's Python stack in this process, as faulthandler writes them; its
    loader processes are asked to write theirs to the job's log (a rank waiting for a
    batch is stuck where its loader is)."""
    with tempfile.TemporaryFile("w+") as handle:
        faulthandler.dump_traceback(file=handle, all_threads=True)
        handle.seek(0)
        stacks = handle.read()
    loaders = []
    try:
        import psutil
        for child in psutil.Process().children():
            if child.name() == LOADER_NAME:  # one at a time, each under its own line
                print(f"hvdtrain: the stacks of loader process {child.pid} (of the rank with pid {os.getpid()}):",
                      file=sys.stderr, flush=True)
                child.send_signal(LOADER_STACKS)
                loaders.append(str(child.pid))
                time.sleep(0.3)
    except Exception:  # noqa: BLE001 -- a loader gone meanwhile; psutil missing
        pass
    if loaders:
        stacks += f"\nLoader processes {', '.join(loaders)}: their stacks are in the job's log (stderr)\n"
    return stacks


def register_loader_stacks() -> None:
    """In a loader process: write every thread's stack to stderr on LOADER_STACKS
    (from C, so even a process stuck in a read answers)."""
    faulthandler.register(LOADER_STACKS, all_threads=True)


class _Server:
    """Rank 0's side: one thread per rank's connection, and the monitor."""

    def __init__(self, hang: float, size: int, output: Path, token: str):
        self.hang, self.size, self.output, self.token = hang, size, output, token
        self.sock = socket.create_server(("", 0), backlog=size + 8)
        self.port = self.sock.getsockname()[1]
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.ranks: dict[int, dict[str, Any]] = {}  # rank -> hello, progress, changed, seen, conn
        self.closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="hvdtrain-watchdog").start()
        threading.Thread(target=self._monitor, daemon=True, name="hvdtrain-watchdog-monitor").start()

    def close(self) -> None:
        self.closing.set()
        self.sock.close()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def _serve(self, conn: socket.socket, peer) -> None:
        reader = conn.makefile("r")
        try:
            conn.settimeout(10)
            hello = json.loads(reader.readline() or "{}")
            if not hmac.compare_digest(str(hello.get("token", "")), self.token):
                print(f"hvdtrain: watchdog: refused a connection from {peer[0]} without this job's token",
                      file=sys.stderr, flush=True)
                return
            conn.settimeout(None)
            rank = int(hello["rank"])
            entry = {"hello": hello, "progress": None, "changed": time.monotonic(), "seen": time.monotonic(),
                     "conn": conn, "send": threading.Lock(), "stacks": None, "waiting": False, "done": False}
            with self.lock:
                self.ranks[rank] = entry
            for line in reader:
                message = json.loads(line)
                now = time.monotonic()
                if "stacks" in message:
                    entry["stacks"], entry["waiting"] = message["stacks"], message.get("waiting", False)
                    continue
                if message.get("phase") == "done":
                    entry["done"] = True
                    return
                entry["seen"] = now
                if message != entry["progress"]:
                    entry["progress"], entry["changed"] = message, now
                with entry["send"]:
                    conn.sendall(b"ok\n")
        except (OSError, ValueError, KeyError):
            return
        finally:
            reader.close()
            conn.close()

    def _monitor(self) -> None:
        every = interval(self.hang)
        while not self.closing.wait(every):
            now = time.monotonic()
            with self.lock:
                entries = dict(self.ranks)
            if len(entries) < self.size and now - self.started > self.hang:
                missing = sorted(set(range(self.size)) - set(entries))
                self._end(f"rank(s) {', '.join(map(str, missing))} never reached the watchdog within "
                          f"{self.hang:g} s", {})
                return
            # a rank past its epochs (export, a test set scored on rank 0 alone) is not watched
            live = {r: e for r, e in entries.items()
                    if not e["done"] and (e["progress"] or {}).get("phase") != "finishing"}
            if any(now - e["changed"] > self.hang for e in live.values()):
                self._report(live, now)
                return

    def _report(self, live: dict[int, dict], now: float) -> None:
        """The ranks that stopped first: those whose heartbeat fell silent, else those
        furthest behind (epoch, step, then phase: a rank that holds the others waits
        at an earlier step than they do) and, among them, those whose main thread is
        not waiting in one of Horovod's collectives."""
        silent = [r for r, e in live.items() if now - e["seen"] > 3 * interval(self.hang)]
        oldest = min(e["changed"] for e in live.values())
        for entry in live.values():  # every rank's stacks, from the ranks that still answer
            try:
                with entry["send"]:
                    entry["conn"].sendall(b"stacks\n")
            except OSError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(e["stacks"] is None for r, e in live.items() if r not in silent):
            time.sleep(0.1)
        behind = min(position(e["progress"]) for e in live.values())
        last = [r for r, e in live.items() if position(e["progress"]) == behind]
        # of the ranks furthest behind, those not waiting in a collective hold the others
        blamed = silent or [r for r in last if not live[r]["waiting"]] or last
        parts = []
        for rank in sorted(blamed):
            hello, done = live[rank]["hello"], live[rank]["progress"] or {}
            parts.append(f"rank {rank} (host {hello['host']}, pid {hello['pid']}: epoch {done.get('epoch', 0) + 1}, "
                         f"step {done.get('step', 0)}, {done.get('phase', 'start-up')}"
                         f"{', heartbeat silent' if rank in silent else ''})")
        self._end(f"{'; '.join(parts)} made no progress for {now - oldest:.0f} s (horovod.hang_seconds "
                  f"{self.hang:g})", {r: e["stacks"] or NO_STACK for r, e in live.items()})

    def _end(self, what: str, stacks: dict[int, str]) -> None:
        where = self.output / "hang"
        try:
            where.mkdir(parents=True, exist_ok=True)
            for rank, text in stacks.items():
                (where / f"rank-{rank}.txt").write_text(text)
            (where / "README.txt").write_text(what + "\n")
            said = f"; every rank's stack is in {where}"
        except OSError as err:
            said = f"; stacks not written ({err}): " + "".join(f"\n[rank {r}]\n{t}" for r, t in stacks.items())
        print(f"hvdtrain: hung: {what}{said}", file=sys.stderr, flush=True)
        os._exit(EXIT_HUNG)
