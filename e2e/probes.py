"""Container probes as the kubelet runs them (exec, tcpSocket, httpGet), with its timing and
thresholds. Part of the e2e node agent (test infrastructure, not product code)."""

from __future__ import annotations

import http.client
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class ProbeResult:
    success: bool
    message: str = ""


def _port(container: Mapping, port: int | str) -> int:
    """A probe port may name one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"no container port named {port!r}")


def run_probe(
    spec: Mapping, container: Mapping, address: str, env: Mapping[str, str], cwd: str
) -> ProbeResult:
    """Run one probe attempt against the container listening on ``address``."""
    timeout = float(spec.get("timeoutSeconds") or 1)
    try:
        if "exec" in spec:
            command = list(spec["exec"].get("command") or [])
            # Like the kubelet, an exec probe's command gets the container's env but no
            # $(VAR) expansion.
            proc = subprocess.run(
                command,
                env=dict(env),
                cwd=cwd,
                capture_output=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
            output = (proc.stdout + proc.stderr).decode(errors="replace").strip()
            if proc.returncode == 0:
                return ProbeResult(True, output)
            return ProbeResult(False, f"exit code {proc.returncode}: {output[-300:]}")
        if "tcpSocket" in spec:
            host = spec["tcpSocket"].get("host") or address
            port = _port(container, spec["tcpSocket"]["port"])
            with socket.create_connection((host, port), timeout=timeout):
                return ProbeResult(True)
        if "httpGet" in spec:
            get = spec["httpGet"]
            host = get.get("host") or address
            port = _port(container, get["port"])
            cls = (
                http.client.HTTPSConnection
                if (get.get("scheme") or "HTTP").upper() == "HTTPS"
                else http.client.HTTPConnection
            )
            conn = cls(host, port, timeout=timeout)
            try:
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                conn.request("GET", get.get("path") or "/", headers=headers)
                status = conn.getresponse().status
            finally:
                conn.close()
            return ProbeResult(200 <= status < 400, f"HTTP {status}")
        return ProbeResult(False, f"unsupported probe handler: {sorted(spec)}")
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"timed out after {timeout:g}s")
    except (OSError, ValueError, http.client.HTTPException) as e:
        return ProbeResult(False, str(e))


@dataclass
class Prober:
    """One probe of one running container: when it is due and what it concluded."""

    kind: str  # readiness, liveness or startup
    spec: Mapping
    started: float  # monotonic time the container started
    success: bool | None = None  # None: no verdict yet
    last_message: str = ""
    _successes: int = 0
    _failures: int = 0
    _next: float = field(default=0.0)

    def __post_init__(self) -> None:
        self._next = self.started + float(self.spec.get("initialDelaySeconds") or 0)

    def due(self, now: float) -> bool:
        return now >= self._next

    def record(self, result: ProbeResult, now: float) -> bool | None:
        """Count an attempt against the thresholds; returns the (possibly new) verdict."""
        self._next = now + float(self.spec.get("periodSeconds") or 10)
        self.last_message = result.message
        if result.success:
            self._successes += 1
            self._failures = 0
            if self._successes >= int(self.spec.get("successThreshold") or 1):
                self.success = True
        else:
            self._failures += 1
            self._successes = 0
            if self._failures >= int(self.spec.get("failureThreshold") or 3):
                self.success = False
        return self.success

    @staticmethod
    def for_container(container: Mapping, started: float | None = None) -> dict[str, Prober]:
        started = time.monotonic() if started is None else started
        probes = {}
        for kind in ("startup", "readiness", "liveness"):
            spec = container.get(f"{kind}Probe")
            if spec:
                probes[kind] = Prober(kind, spec, started)
        return probes
