"""Processes the e2e infrastructure starts: each in its own process group with a log file,
stopped with SIGTERM then SIGKILL within a bounded time, and recognisable again after a
restart of the controlling program (pid plus start time, so a recycled pid is never hit)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def alive(pid: int, start_time: int | None) -> bool:
    now = process_start_time(pid)
    if now is None or (start_time is not None and now != start_time):
        return False
    # A zombie has exited; it only waits for its parent to reap it.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def tail(path: Path, lines: int = 40) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class ProcessRecord:
    """What is needed to find and stop a process later, also from another program."""

    name: str
    pid: int
    start_time: int | None
    log: str

    def to_dict(self) -> dict:
        return {"name": self.name, "pid": self.pid, "start_time": self.start_time, "log": self.log}

    @classmethod
    def from_dict(cls, d: Mapping) -> ProcessRecord:
        return cls(d["name"], int(d["pid"]), d.get("start_time"), d["log"])

    def alive(self) -> bool:
        return alive(self.pid, self.start_time)

    def tail(self, lines: int = 40) -> str:
        return tail(Path(self.log), lines)

    def stop(self, grace: float = 10.0, popen: subprocess.Popen | None = None) -> None:
        """SIGTERM the process group, wait up to ``grace`` seconds, then SIGKILL it."""
        if not self.alive():
            _reap(popen)
            return
        _signal_group(self.pid, signal.SIGTERM)
        if _wait_gone(self, grace, popen):
            return
        _signal_group(self.pid, signal.SIGKILL)
        if not _wait_gone(self, 5.0, popen):
            raise RuntimeError(f"{self.name} (pid {self.pid}) survived SIGKILL")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # Every process here leads its own group (start_new_session), so the group id is its pid.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _reap(popen: subprocess.Popen | None) -> None:
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=0)


def _wait_gone(rec: ProcessRecord, timeout: float, popen: subprocess.Popen | None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(popen)
        if not rec.alive():
            return True
        time.sleep(0.05)
    return False


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGTERM it when the parent
    # goes, so a test run killed with SIGKILL leaves no control plane behind.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def start(
    name: str,
    argv: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    die_with_parent: bool = False,
) -> tuple[ProcessRecord, subprocess.Popen]:
    """Start ``argv`` as the leader of a new session, stdout and stderr appended to ``log``.

    ``die_with_parent``: SIGTERM it when the starting thread exits (Linux PR_SET_PDEATHSIG).
    Only for processes started before any other thread runs: it needs a preexec hook."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
    return ProcessRecord(name, popen.pid, process_start_time(popen.pid), str(log)), popen
