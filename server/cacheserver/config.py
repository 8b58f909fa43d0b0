"""Server settings: one dataclass, filled by the CLI (flags, or environment variables)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

DEFAULT_PORT = 11211
DEFAULT_MEMORY_MB = 64

_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)[bB]?\s*$")
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def worker_path(path: str, worker: int, workers: int) -> str:
    """A file of one worker: PATH itself for one worker, PATH.<i> with -t N."""
    return path if workers == 1 else f"{path}.{worker}"


def parse_size(text: str) -> int:
    """A byte size as memcached's -I takes it: a number with an optional k, m or g suffix."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use a number of bytes, or e.g. 512k, 1m)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


@dataclass(frozen=True)
class Listener:
    """One TCP listener of ``-l``: its address, its port (None: the ``-p`` port) and whether
    it speaks TLS (every listener does with -Z, unless written ``notls:``)."""

    host: str
    port: int | None
    tls: bool

    def port_for(self, default: int, worker: int) -> int:
        """The port worker ``worker`` binds: ``-p``'s (already its own) or this one + worker."""
        return default if self.port is None else self.port + worker


def parse_listen(text: str, tls: bool = False) -> list[Listener]:
    """memcached's ``-l``: addresses separated by ``,`` or ``;``, each ``host``, ``host:port``,
    ``[ipv6]``, ``[ipv6]:port`` or ``*`` (every interface), with a ``notls:`` prefix for a
    plaintext listener next to TLS ones (only with -Z). ValueError naming the bad entry."""
    listeners = []
    for entry in re.split(r"[;,]", text):
        spec = entry.strip()
        if not spec:
            raise ValueError(f"empty address in {text!r}")
        secure = tls
        if spec.startswith("notls:"):
            if not tls:
                raise ValueError(f"{spec!r}: 'notls' is only valid with -Z (TLS)")
            secure = False
            spec = spec[len("notls:") :]
        port: int | None = None
        if spec.startswith("["):
            host, bracket, rest = spec[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(
                    f"{entry.strip()!r}: an IPv6 address is written [addr] or [addr]:port"
                )
            if rest:
                port = _listen_port(rest[1:], entry)
        elif spec.count(":") == 1:
            host, _, number = spec.partition(":")
            port = _listen_port(number, entry)
        else:
            host = spec  # a name, an IPv4 address, or an IPv6 address without a port
        if host == "*":
            host = "0.0.0.0"
        if not host:
            raise ValueError(f"{entry.strip()!r} names no address")
        listeners.append(Listener(host, port, secure))
    return listeners


def _listen_port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise ValueError(f"{entry.strip()!r}: {text!r} is not a port (1-65535)")
    return int(text)


@dataclass
class Settings:
    port: int = DEFAULT_PORT
    udp_port: int = 0
    listen: str = "0.0.0.0"
    memory_limit_mb: int | None = None  # None: size from the cgroup ("auto"), the default
    memory_headroom_mb: int | None = None
    conn_limit: int = 1024
    max_item_size: int = 1024 * 1024
    verbose: int = 0
    metrics_port: int = 0
    idle_timeout: int = 0
    workers: int = 1
    pin: bool = False
    udp_allow_all: bool = False
    python_only: bool = False  # serve without the compiled fast path
    cluster_config: str | None = None  # membership file for `config get cluster`; None: off
    # Where a fatal reason goes for Kubernetes (written only if the file exists).
    termination_log: str = "/dev/termination-log"
    memory_file: str = ""  # -e: warm-restart snapshot (see warm.py), "" is off
    disable_flush_all: bool = False  # -F: flush_all is refused
    enable_shutdown: bool = False  # -A: the shutdown command stops the server
    disable_dumping: bool = False  # -X: no stats cachedump, no lru_crawler metadump
    # -Y: memcached's text-protocol authentication from this credentials file, "" is off
    auth_file: str = ""
    # -Z and memcached's -o ssl_* options (security/tls.py)
    ssl_enabled: bool = False
    ssl_chain_cert: str = ""
    ssl_key: str = ""
    ssl_ca_cert: str = ""
    ssl_verify_mode: int = 0  # 0 none, 1 request, 2 require, 3 once (as 2: no renegotiation)
    ssl_ciphers: str = ""
    # Unix socket answering version and stats only, without authentication or TLS: for the
    # probe and the supervisor of -t N (worker i uses PATH.i). "" is off.
    admin_socket: str = ""

    @cached_property
    def listeners(self) -> list[Listener]:
        return parse_listen(self.listen, self.ssl_enabled)

    @property
    def host(self) -> str:
        """The address the metrics endpoint listens on: the first listener's."""
        return self.listeners[0].host

    @property
    def memory_limit_bytes(self) -> int:
        return (self.memory_limit_mb or DEFAULT_MEMORY_MB) * 1024 * 1024
