"""Server settings: one dataclass, filled by the CLI (flags, or environment variables)."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PORT = 11211
DEFAULT_MEMORY_MB = 64

_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)[bB]?\s*$")
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """A byte size as memcached's -I takes it: a number with an optional k, m or g suffix."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use a number of bytes, or e.g. 512k, 1m)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


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

    @property
    def memory_limit_bytes(self) -> int:
        return (self.memory_limit_mb or DEFAULT_MEMORY_MB) * 1024 * 1024
