"""The membership one appliance serves, kept in step with the file the operator publishes.

The file is a ConfigMap key mounted as a volume: the kubelet replaces it by writing a new
directory and swapping the ``..data`` symlink, so the path's target (inode, size, mtime)
changes with every update. ``poll()``, called once a second from the worker's timer (never
on the request path), stats the path and reads it only when that signature moved; the
replies are built once per change, so serving one costs no more than returning bytes.

A file that disappears, cannot be read or does not parse leaves the last good membership in
service (counted in ``load_errors`` and logged): a half-written or broken update must never
empty a client's server list.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from cacheserver.discovery.membership import (
    MAX_FILE_BYTES,
    NOT_LOADED,
    Membership,
    MembershipError,
    config_data,
    config_reply,
    parse_membership,
    value_reply,
)

log = logging.getLogger("cacheserver")

_MISS = b"END\r\n"


class ClusterConfig:
    """What ``config get cluster`` answers on this worker, and where it comes from."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self.membership: Membership | None = None
        self.loaded_at: float | None = None  # when this server took the current membership
        self.load_errors = 0
        self.requests = 0
        self._config_reply = NOT_LOADED
        self._value_reply = _MISS  # as a get of a key that does not exist
        self._signature: tuple[int, int, int, int] | None = None
        self._raw: bytes | None = None
        self._unreadable = False

    # -- the request path: bytes built when the membership changed ----------------------------

    def config_get(self) -> bytes:
        self.requests += 1
        return self._config_reply

    def key_get(self) -> bytes:
        self.requests += 1
        return self._value_reply

    # -- the timer ----------------------------------------------------------------------------

    def poll(self) -> bool:
        """Reload the file if it changed; True when a new membership is now served."""
        try:
            st = os.stat(self.path)
            signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if signature == self._signature:
                return False
            with open(self.path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as err:
            # Missing or unreadable: try again next second, but count and log it once.
            self._signature = None
            if not self._unreadable:
                self._unreadable = True
                self.load_errors += 1
                log.warning("cluster configuration %s: %s; %s", self.path, err, self._serving())
            return False
        self._unreadable = False
        self._signature = signature
        if data == self._raw:
            return False  # the kubelet rewrote the volume, this key is as it was
        self._raw = data
        try:
            membership = parse_membership(data)
        except MembershipError as err:
            self.load_errors += 1
            log.warning("cluster configuration %s: %s; %s", self.path, err, self._serving())
            return False
        self.serve(membership)
        return True

    def serve(self, membership: Membership) -> None:
        """Answer with this membership from now on (poll() calls it for each new file)."""
        old = self.membership
        if old is not None and membership.version < old.version:
            log.warning(
                "cluster configuration version went back from %d to %d: the file wins",
                old.version,
                membership.version,
            )
        data = config_data(membership)
        self._config_reply = config_reply(data)
        self._value_reply = value_reply(data)
        self.membership = membership
        self.loaded_at = self._clock()
        log.info(
            "cluster configuration version %d: %d node(s)",
            membership.version,
            len(membership.nodes),
        )

    def _serving(self) -> str:
        if self.membership is None:
            return "nothing to serve yet"
        return f"still serving version {self.membership.version}"

    # -- what stats and /metrics show ---------------------------------------------------------

    def age(self) -> float:
        """Seconds since the membership last changed (by the operator's clock when the file
        says when; else since this server loaded it); 0 before the first load."""
        m = self.membership
        if m is None or self.loaded_at is None:
            return 0.0
        since = m.changed if m.changed is not None else self.loaded_at
        return max(0.0, self._clock() - since)

    def lag(self) -> float:
        """Seconds from the change to this server serving it: the propagation delay."""
        m = self.membership
        if m is None or m.changed is None or self.loaded_at is None:
            return 0.0
        return max(0.0, self.loaded_at - m.changed)

    def stats_fields(self) -> list[tuple[str, object]]:
        m = self.membership
        return [
            ("cluster_config_version", m.version if m else 0),
            ("cluster_config_nodes", len(m.nodes) if m else 0),
            ("cluster_config_age", int(self.age())),
            ("cluster_config_lag", int(self.lag())),
            ("cluster_config_load_errors", self.load_errors),
            ("cluster_config_requests", self.requests),
        ]

    def settings_fields(self) -> list[tuple[str, object]]:
        return [("cluster_config", self.path)]
