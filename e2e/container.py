"""One container of a pod as a local process: start it inside its cgroups, notice when it
exits, restart it per restartPolicy with the kubelet's back-off, probe it, stop it with
SIGTERM then SIGKILL. Part of the e2e node agent (test infrastructure, not product code)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from e2e import procs
from e2e.probes import Prober, run_probe

# The kubelet's crash-loop back-off: the first restart is immediate, then 10s doubling to 5m;
# a container that ran for 10 minutes is forgiven its past crashes.
BACKOFF_INITIAL = 10.0
BACKOFF_MAX = 300.0
BACKOFF_RESET_AFTER = 600.0


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class LaunchPlan:
    """Everything needed to start the process, worked out by the pod worker."""

    argv: list[str]  # already wrapped to join the container's cgroups
    command: list[str]  # the container's own command line (for messages)
    env: dict[str, str]
    cwd: Path
    log_dir: Path
    probe_env: dict[str, str]


class Container:
    def __init__(self, spec: Mapping, address: str, restart_policy: str) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.address = address
        self.restart_policy = restart_policy
        self.record: procs.ProcessRecord | None = None
        self.popen: subprocess.Popen | None = None
        self.restart_count = 0
        self.started_at: str | None = None
        self.started_mono = 0.0
        self.terminated: dict | None = None  # state.terminated of the current run, once it ended
        self.last_state: dict | None = None  # lastState.terminated
        self.waiting: tuple[str, str] | None = ("ContainerCreating", "")
        self.ready = False
        self.probers: dict[str, Prober] = {}
        self.backoff = 0.0
        self.next_start = 0.0
        self.plan: LaunchPlan | None = None

    # ---- state ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.popen is not None and self.terminated is None

    @property
    def finished(self) -> bool:
        """Terminated and, by restart policy, not coming back."""
        if self.terminated is None:
            return False
        code = self.terminated["exitCode"]
        return self.restart_policy == "Never" or (self.restart_policy == "OnFailure" and code == 0)

    @property
    def started(self) -> bool:
        startup = self.probers.get("startup")
        return self.running and (startup is None or bool(startup.success))

    def status(self, image: str) -> dict:
        if self.running:
            state = {"running": {"startedAt": self.started_at}}
        elif self.terminated is not None and (self.finished or self.waiting is None):
            state = {"terminated": self.terminated}
        else:
            reason, message = self.waiting or ("ContainerCreating", "")
            state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        status = {
            "name": self.name,
            "image": image,
            "imageID": "",
            "ready": self.ready and self.running,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_state} if self.last_state else {},
        }
        if self.record is not None:
            # Not a real container runtime: the id is the process id, handy when debugging.
            status["containerID"] = f"nodeagent://{self.record.pid}"
        return status

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self, plan: LaunchPlan) -> None:
        executable = plan.command[0] if plan.command else ""
        if not shutil.which(executable, path=plan.env.get("PATH")):
            raise FileNotFoundError(f"executable {executable!r} not found in PATH")
        if self.terminated is not None:
            self.last_state = self.terminated
            self.restart_count += 1
        self.plan = plan
        log = plan.log_dir / self.name / f"{self.restart_count}.log"
        self.record, self.popen = procs.start(self.name, plan.argv, log, env=plan.env, cwd=plan.cwd)
        self.started_at = now_rfc3339()
        self.started_mono = time.monotonic()
        self.terminated = None
        self.waiting = None
        self.ready = False
        self.probers = Prober.for_container(self.spec, self.started_mono)
        if "readiness" not in self.probers:
            self.ready = True  # without a readiness probe the kubelet counts a running one ready

    def poll(self) -> bool:
        """Notice an exit; True if the container just terminated."""
        if not self.running or self.popen is None:
            return False
        code = self.popen.poll()
        if code is None:
            return False
        self._mark_terminated(code)
        return True

    def _mark_terminated(self, code: int) -> None:
        finished = now_rfc3339()
        if code < 0:  # killed by a signal: report it as a shell would
            exit_code, reason = 128 - code, "Error"
        else:
            exit_code, reason = code, "Completed" if code == 0 else "Error"
        self.terminated = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": self.started_at,
            "finishedAt": finished,
            **({"signal": -code} if code < 0 else {}),
        }
        self.ready = False
        if time.monotonic() - self.started_mono >= BACKOFF_RESET_AFTER:
            self.backoff = 0.0
        # First restart right away, then 10s, 20s, ... as the kubelet does.
        delay = self.backoff
        self.next_start = time.monotonic() + delay
        self.backoff = min(BACKOFF_MAX, delay * 2 if delay else BACKOFF_INITIAL)
        self.waiting = None
        if not self.finished and delay > 0:
            message = f"back-off {delay:.0f}s restarting failed container={self.name}"
            self.waiting = ("CrashLoopBackOff", message)

    def wants_start(self, now: float) -> bool:
        if self.running or self.finished:
            return False
        return now >= self.next_start

    def probe(self, now: float, on_unhealthy: Callable[[str, str], None]) -> bool:
        """Run the probes that are due; returns True if the container must be restarted
        (liveness or startup probe failed)."""
        if not self.running or self.plan is None:
            return False
        startup = self.probers.get("startup")
        order = ["startup"] if startup and not startup.success else ["readiness", "liveness"]
        for kind in order:
            prober = self.probers.get(kind)
            if prober is None or not prober.due(now):
                continue
            result = run_probe(
                prober.spec, self.spec, self.address, self.plan.probe_env, str(self.plan.cwd)
            )
            before = prober.success
            verdict = prober.record(result, time.monotonic())
            if not result.success:
                on_unhealthy(kind, result.message)
            if kind == "readiness":
                self.ready = bool(verdict)
            elif verdict is False and kind in ("liveness", "startup") and before is not False:
                return True
        return False

    def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; records the termination."""
        if self.record is None or not self.running:
            return
        self.record.stop(grace, self.popen)
        code = self.popen.poll() if self.popen else None
        self._mark_terminated(code if code is not None else -signal.SIGKILL)

    def kill_for_restart(self, grace: float) -> None:
        self.stop(grace)


def default_path() -> str:
    """PATH for containers: this Python's bin directory first, so console scripts of the
    project's virtual environment (cacheserver, cacheserver-probe) are found."""
    import sys

    bin_dir = str(Path(sys.executable).parent)
    rest = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    return f"{bin_dir}:{rest}"
