"""Side-by-side benchmark: Debian's memcached and cacheserver, same settings, same load,
driven alternately in one run. Prints a markdown table with ops/s, median and p99 latency,
server CPU seconds per million requests, and the ratio cacheserver/memcached.

Workloads (the field reports', scaled to this machine):
  W1  memcaslap, 90% get / 10% set, TCP, one server core
  W2  the same over UDP
  W3  multi-get, 16 keys per request (memcaslap -d 16)
  W4  1:1 get/set, 100-byte values, 16 requests per packet, few to many connections (loadgen)
  W5  10,000 idle connections: resident memory per connection
  W6  the meta protocol, 90% mg / 10% ms, 100-byte values, 64 connections, one request at a
      time each (loadgen meta)
  W7  the meta protocol's quiet batch: 16 "mg <key> v q" closed by "mn", pipelined, 50
      connections (loadgen metaq; the 16 gets count as operations)
  W8  W4 over TLS: memcached -Z and cacheserver -Z, same certificate (P-256); and one
      request per round trip
  W9  W4 with -Y authentication on both (each connection authenticates before the clock)

Loopback only; every run is bounded in time. Usage: python bench/compare.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# The repository root, for testkit/ (the helpers the tests and the benchmarks share).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testkit.net import free_port, wait_for_port
from testkit.procs import cpu_seconds, status_kib

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / ".build" / "loadgen"
CREDENTIALS = ("bench", "bench-password")
HOST = "127.0.0.1"


@dataclass
class Result:
    ops_per_sec: float
    median_us: float
    p99_us: float
    requests: int
    cpu_seconds: float

    @property
    def cpu_per_million(self) -> float:
        return self.cpu_seconds / self.requests * 1e6 if self.requests else float("nan")


class Server:
    def __init__(
        self,
        name: str,
        server_cpu: int | None,
        memory_mb: int,
        conns: int,
        source: Path | None = None,
        extra: tuple[str, ...] = (),
        security: tuple[str, ...] = (),
    ) -> None:
        """memcached, or cacheserver (from ``source``, a checkout's server/ dir, if given,
        with ``extra`` flags); ``security``: -Z or -Y flags both servers take."""
        self.name = name
        self.port = free_port()
        taskset = ["taskset", "-c", str(server_cpu)] if server_cpu is not None else []
        udp = "0" if security else str(self.port)  # UDP cannot carry -Y, nor TLS
        common = ["-l", HOST, "-p", str(self.port), "-U", udp, "-c", str(conns), *security]
        env = dict(os.environ)
        if name == "memcached":
            cmd = ["memcached", *common, "-m", str(memory_mb), "-t", "1"]
            if os.geteuid() == 0:
                cmd += ["-u", "root"]
        else:
            cmd = [sys.executable, "-m", "cacheserver", *common, "-m", str(memory_mb), *extra]
            if source is not None:
                env["PYTHONPATH"] = str(source)
        self.proc = subprocess.Popen(
            taskset + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        wait_for_port(self.port, self.proc, host=HOST)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def measure(self, load: Callable[[], tuple[float, float, float, int]]) -> Result:
        before = sum(cpu_seconds(self.proc.pid))
        try:
            ops, median, p99, requests = load()
        except RuntimeError as e:
            raise RuntimeError(f"{self.name}: {e}") from None
        return Result(ops, median, p99, requests, sum(cpu_seconds(self.proc.pid)) - before)


def log2_quantiles(text: str, section: str) -> tuple[float, float]:
    """Median and p99 from a memcaslap 'Log2 Dist' histogram (bucket 2^i..2^(i+1) us)."""
    block = text.split(section, 1)[1] if section in text else ""
    counts: dict[int, int] = {}
    for match in re.finditer(r"^\s+(\d+):((?:\s+\d+)+)\s*$", block.split("\n\n")[0], re.M):
        base = int(match.group(1))
        for offset, count in enumerate(match.group(2).split()):
            counts[base + offset] = int(count)
    total = sum(counts.values())
    if not total:
        return float("nan"), float("nan")

    def quantile(q: float) -> float:
        seen = 0
        for exp in sorted(counts):
            if seen + counts[exp] >= q * total:
                frac = (q * total - seen) / counts[exp] if counts[exp] else 0
                return 2**exp * (1 + frac)  # linear inside the bucket [2^e, 2^(e+1))
            seen += counts[exp]
        return float(2 ** max(counts))

    return quantile(0.5), quantile(0.99)


def memcaslap(
    port: int, seconds: int, client_cpu: int | None, extra: list[str]
) -> Callable[[], tuple[float, float, float, int]]:
    def run() -> tuple[float, float, float, int]:
        taskset = ["taskset", "-c", str(client_cpu)] if client_cpu is not None else []
        cmd = [
            *taskset, "memcaslap", "-s", f"{HOST}:{port}", "-T", "1", "-c", "64",
            "-t", f"{seconds}s", "-S", f"{seconds}s", *extra,
        ]  # fmt: skip
        for _attempt in range(3):
            # memcaslap itself aborts now and then over UDP on a starved machine (an assertion
            # on a late reply); such a run says nothing about the server: run it again.
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
            out = result.stdout
            match = re.search(r"Ops: (\d+) TPS: (\d+)", out)
            if match:
                break
        else:
            raise RuntimeError(f"memcaslap failed 3 times:\n{out[-1000:]}{result.stderr[-1000:]}")
        median, p99 = log2_quantiles(out, "Total Statistics (")
        return float(match.group(2)), median, p99, int(match.group(1))

    return run


def loadgen(
    port: int,
    seconds: int,
    client_cpu: int | None,
    conns: int,
    options: tuple[str, ...] = (),
    depth: int = 16,
    mode: str = "text",
) -> Callable[[], tuple[float, float, float, int]]:
    def run() -> tuple[float, float, float, int]:
        taskset = ["taskset", "-c", str(client_cpu)] if client_cpu is not None else []
        cmd = [*taskset, str(LOADGEN), *options, HOST, str(port), str(conns), str(seconds)]
        cmd += [str(depth), "100", "10000", mode]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        values = dict(item.split("=") for item in done.stdout.split())
        if int(values.get("errors", "0")):
            raise RuntimeError(
                f"loadgen saw {values['errors']} unexpected replies: {done.stdout}{done.stderr}"
            )
        return (
            float(values["ops_per_sec"]),
            float(values["median_us"]),
            float(values["p99_us"]),
            int(values["ops"]),
        )

    return run


def idle_connection_bytes(server: Server, count: int) -> float:
    """Resident memory per idle connection: RSS before and after opening ``count``."""
    before = status_kib(server.proc.pid, "VmRSS") * 1024
    socks = []
    try:
        for _ in range(count):
            s = socket.create_connection((HOST, server.port), timeout=10)
            socks.append(s)
        # Each connection does one round trip, so the server has fully set it up.
        for s in socks[:: max(1, count // 100)]:
            s.sendall(b"version\r\n")
            s.recv(100)
        time.sleep(1)
        return (status_kib(server.proc.pid, "VmRSS") * 1024 - before) / count
    finally:
        for s in socks:
            s.close()


def build_loadgen() -> bool:
    """Build the load generator (with TLS when OpenSSL's headers are there); True with TLS."""
    source = HERE / "loadgen.c"
    if not LOADGEN.exists() or LOADGEN.stat().st_mtime < source.stat().st_mtime:
        LOADGEN.parent.mkdir(exist_ok=True)
        tls = ["cc", "-O2", "-DWITH_TLS", "-o", str(LOADGEN), str(source), "-lssl", "-lcrypto"]
        if subprocess.run(tls, capture_output=True).returncode != 0:
            subprocess.run(["cc", "-O2", "-o", str(LOADGEN), str(source)], check=True)
    probe = subprocess.run([str(LOADGEN), "--tls"], capture_output=True, text=True)
    return "built without TLS" not in probe.stderr


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for 127.0.0.1 (the load generator does not check it)."""
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
            "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of each run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per server and workload")
    parser.add_argument("--idle-connections", type=int, default=10_000)
    parser.add_argument(
        "--only", default="W1,W2,W3,W4,W5,W6,W7,W8,W9", help="comma-separated workloads"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout's server/ dir: also run its cacheserver (before/after rows)",
    )
    parser.add_argument(
        "--python-path",
        action="store_true",
        help="also run cacheserver --python-only (the server without its compiled fast path)",
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    tools = ["memcached", "taskset"] + ([] if LOADGEN.exists() else ["cc"])
    if only & {"W1", "W2", "W3"}:
        tools.append("memcaslap")  # the others use bench/loadgen.c
    for tool in tools:
        if shutil.which(tool) is None:
            sys.exit(f"compare.py: {tool} not found (scripts/bootstrap.sh installs it)")
    with_tls = build_loadgen()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    if "W8" in only and not (with_tls and shutil.which("openssl")):
        sys.exit("compare.py: W8 needs OpenSSL's headers (libssl-dev) and the openssl command")
    conns = args.idle_connections + 100
    scratch = Path(tempfile.mkdtemp(prefix="compare-"))
    # The security flags each kind of run gives both servers, and the load generator's.
    kinds: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {"plain": ((), ())}
    if "W8" in only:
        cert, key = make_certificate(scratch)
        kinds["tls"] = (("-Z", "-o", f"ssl_chain_cert={cert},ssl_key={key}"), ("--tls",))
    if "W9" in only:
        credentials = scratch / "credentials"
        credentials.write_text(":".join(CREDENTIALS) + "\n")
        kinds["auth"] = (("-Y", str(credentials)), ("--auth", ":".join(CREDENTIALS)))

    print(f"# cacheserver vs memcached, {datetime.date.today()} on {platform.node()}")
    print(
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), server on CPU "
        f"{server_cpu}, client on CPU {client_cpu}; {args.repeat} runs of {args.seconds}s, "
        "medians shown\n"
    )

    def start_all(kind: str = "plain") -> dict[str, Server]:
        security = kinds[kind][0]
        started = {
            name: Server(name, server_cpu, 1024, conns, security=security)
            for name in ("memcached", "cacheserver")
        }
        if args.python_path:
            started["python-only"] = Server(
                "python-only", server_cpu, 1024, conns, extra=("--python-only",), security=security
            )
        if args.baseline and not security:
            started["baseline"] = Server("baseline", server_cpu, 1024, conns, args.baseline)
        return started

    servers: dict[str, Server] = {}
    try:
        workloads: list[tuple[str, str, Callable[[Server], Callable[[], tuple]]]] = []
        if "W1" in only:
            workloads.append(
                ("W1 TCP 90/10", "plain", lambda s: memcaslap(s.port, args.seconds, client_cpu, []))
            )
        if "W2" in only:
            workloads.append(
                (
                    "W2 UDP 90/10",
                    "plain",
                    lambda s: memcaslap(s.port, args.seconds, client_cpu, ["--udp"]),
                )
            )
        if "W3" in only:
            workloads.append(
                (
                    "W3 multi-get x16",
                    "plain",
                    lambda s: memcaslap(s.port, args.seconds, client_cpu, ["-d", "16"]),
                )
            )
        if "W6" in only:
            workloads.append(
                (
                    "W6 meta 90/10 mg/ms, 64 conns",
                    "plain",
                    lambda s: loadgen(s.port, args.seconds, client_cpu, 64, depth=1, mode="meta"),
                )
            )
        if "W7" in only:
            workloads.append(
                (
                    "W7 meta quiet mg x16 + mn, 50 conns",
                    "plain",
                    lambda s: loadgen(s.port, args.seconds, client_cpu, 50, depth=17, mode="metaq"),
                )
            )
        for name, kind, label in (
            ("W4", "plain", "W4 1:1 pipelined x16"),
            ("W8", "tls", "W8 TLS 1:1 pipelined x16"),
            ("W9", "auth", "W9 -Y 1:1 pipelined x16"),
        ):
            if name not in only:
                continue
            options = kinds[kind][1]
            for c in (4, 50, 400) if name != "W9" else (50,):
                workloads.append(
                    (
                        f"{label}, {c} conns",
                        kind,
                        lambda s, c=c, o=options: loadgen(s.port, args.seconds, client_cpu, c, o),
                    )
                )
            if name == "W8":  # one request per round trip: the per-read costs show
                workloads.append(
                    (
                        "W8 TLS 1:1 not pipelined, 50 conns",
                        kind,
                        lambda s, o=options: loadgen(s.port, args.seconds, client_cpu, 50, o, 1),
                    )
                )
        workloads.sort(key=lambda w: int(w[0].split()[0][1:]))  # in W order (stable)
        print("| workload | server | ops/s | median µs | p99 µs | CPU s / M req | ratio ops/s |")
        print("|---|---|---:|---:|---:|---:|---:|")
        running = ("", "")
        for label, kind, make in workloads:
            # Fresh servers for each workload (W4's three connection counts share them): what
            # one workload stored must not decide the next one's results. memcached filled by
            # W1-W3 refuses some of W4's sets (SERVER_ERROR out of memory storing object:
            # its memory is in other slab classes' pages).
            workload = label.split()[0]
            if (workload, kind) != running:
                for server in servers.values():
                    server.stop()
                servers, running = start_all(kind), (workload, kind)
            results: dict[str, list[Result]] = {name: [] for name in servers}
            for _ in range(args.repeat):
                for name, server in servers.items():  # alternate: same conditions for both
                    results[name].append(server.measure(make(server)))
            med = {
                name: Result(
                    statistics.median(r.ops_per_sec for r in rs),
                    statistics.median(r.median_us for r in rs),
                    statistics.median(r.p99_us for r in rs),
                    sum(r.requests for r in rs),
                    sum(r.cpu_seconds for r in rs),
                )
                for name, rs in results.items()
            }
            for name, r in med.items():
                ratio = r.ops_per_sec / med["memcached"].ops_per_sec
                shown = "" if name == "memcached" else f"{ratio:.2f}x"
                print(
                    f"| {label} | {name} | {r.ops_per_sec:,.0f} | {r.median_us:.0f} | "
                    f"{r.p99_us:.0f} | {r.cpu_per_million:.2f} | {shown} |"
                )
            sys.stdout.flush()
        if "W5" in only:
            # Fresh servers: memory freed by the earlier runs would hide what connections cost.
            for server in servers.values():
                server.stop()
            servers = start_all()
            per_conn = {
                name: idle_connection_bytes(s, args.idle_connections) for name, s in servers.items()
            }
            print(f"\n| W5 {args.idle_connections:,} idle connections | bytes per connection |")
            print("|---|---:|")
            for name, value in per_conn.items():
                print(f"| {name} | {value:,.0f} |")
            for name, value in per_conn.items():
                if name != "memcached":
                    print(f"| ratio {name}/memcached | {value / per_conn['memcached']:.2f}x |")
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
