r"""The cluster membership and ElastiCache's replies for it: pure functions, no I/O.

The operator publishes the membership as JSON (a ConfigMap key mounted as a file):

    {"version": 3, "changed": "2030-01-01T00:00:00Z",
     "nodes": [{"host": "cache-0.cache-headless.ns.svc", "ip": "10.0.0.1", "port": 11211}]}

Every appliance answers with ElastiCache's data block: the version and "\n", the nodes as
host|ip|port separated by spaces, in the order of the file, and "\n". The two requests:

    config get cluster
    CONFIG cluster 0 <bytes>\r\n<data block>\r\nEND\r\n

    get AmazonElastiCache:cluster
    VALUE AmazonElastiCache:cluster 0 <bytes>\r\n<data block>\r\nEND\r\n

<bytes> counts the data block exactly, both of its "\n" included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

# The key that engines before memcached 1.4.14 served the configuration under.
CLUSTER_KEY = b"AmazonElastiCache:cluster"
# Before the first membership is loaded there is nothing true to answer.
NOT_LOADED = b"SERVER_ERROR cluster configuration not loaded\r\n"
MAX_FILE_BYTES = 8 * 1024 * 1024  # 1000 pods x 64 workers fit with room to spare


class MembershipError(ValueError):
    """A membership file that cannot be served; the message names the field."""


@dataclass(frozen=True)
class Node:
    host: str
    ip: str
    port: int


@dataclass(frozen=True)
class Membership:
    version: int
    nodes: tuple[Node, ...]
    changed: float | None = None  # Unix time the operator last changed it, if it says


def _text(value: object, where: str, *, empty_ok: bool = False) -> str:
    # The reply separates fields with "|" and nodes with " ": neither may appear in one.
    if not isinstance(value, str):
        raise MembershipError(f"{where} must be a string")
    if not value and not empty_ok:
        raise MembershipError(f"{where} must not be empty")
    if not value.isascii() or any(c in value for c in "| ") or not value.isprintable():
        raise MembershipError(f"{where} must be printable ASCII without spaces or '|'")
    return value


def _int(value: object, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise MembershipError(f"{where} must be a whole number from {low} to {high}")
    return value


def parse_time(value: str) -> float:
    """An RFC 3339 UTC time as the operator writes it (2030-01-01T00:00:00Z), as Unix time."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise MembershipError(f"changed: {value!r} is not an RFC 3339 time") from None
    if parsed.tzinfo is None:
        raise MembershipError(f"changed: {value!r} has no time zone")
    return parsed.timestamp()


def parse_membership(data: bytes) -> Membership:
    """The membership in a file's bytes; raises MembershipError naming what is wrong."""
    if len(data) > MAX_FILE_BYTES:
        raise MembershipError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MembershipError(f"not JSON: {err}") from None
    if not isinstance(raw, dict):
        raise MembershipError("must be a JSON object")
    version = _int(raw.get("version"), "version", 0, 2**63 - 1)
    changed = raw.get("changed")
    if changed is not None:
        changed = parse_time(_text(changed, "changed"))
    nodes = raw.get("nodes")
    if not isinstance(nodes, list):
        raise MembershipError("nodes must be a list")
    parsed = []
    for i, node in enumerate(nodes):
        where = f"nodes[{i}]"
        if not isinstance(node, dict):
            raise MembershipError(f"{where} must be an object")
        parsed.append(
            Node(
                host=_text(node.get("host"), f"{where}.host"),
                ip=_text(node.get("ip", ""), f"{where}.ip", empty_ok=True),
                port=_int(node.get("port"), f"{where}.port", 1, 65535),
            )
        )
    return Membership(version=version, nodes=tuple(parsed), changed=changed)


def config_data(membership: Membership) -> bytes:
    """ElastiCache's data block: the version line, then every node on one line."""
    nodes = " ".join(f"{n.host}|{n.ip}|{n.port}" for n in membership.nodes)
    return f"{membership.version}\n{nodes}\n".encode("ascii")


def config_reply(data: bytes) -> bytes:
    """The reply to ``config get cluster``."""
    return b"CONFIG cluster 0 %d\r\n%s\r\nEND\r\n" % (len(data), data)


def value_reply(data: bytes) -> bytes:
    """The reply to ``get AmazonElastiCache:cluster``: the same block, as a stored value."""
    return b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (CLUSTER_KEY, len(data), data)
