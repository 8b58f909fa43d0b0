"""Cross-field rules of a CacheCluster, each written twice: as Python and as CEL.

The Python half runs in the pydantic models (so the operator, the tests and anyone calling
`CacheClusterManifest.model_validate` see it); the CEL half goes into the CRD as
`x-kubernetes-validations`, so the API server rejects the same specs before they are stored.
Keeping both halves in one table is what lets a test check that neither drifts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from cacheoperator.quantity import MIB, to_decimal

if TYPE_CHECKING:
    from cacheoperator.models import CacheClusterSpec

# Reasons the API server knows for x-kubernetes-validations.
FORBIDDEN = "FieldValueForbidden"
REQUIRED = "FieldValueRequired"
INVALID = "FieldValueInvalid"

# Server flags the operator sets from the spec; passing them again in extraArgs would make
# the pod disagree with the spec (and with the endpoints in the status).
OWNED_FLAGS_RE = (
    "^(-[pUlmteYZoF]|--(port|udp-port|listen|memory-limit|memory-headroom|memory-file|workers|pin"
    "|metrics-port|auth-file|enable-ssl|extended|ssl-[a-z-]+|disable-flush-all|admin-socket)"
    "(=|$))"
)
# The least memory limit the server starts in with its default flags. Measured: one server
# process is about 29 MiB resident at start (the interpreter and its modules); the server
# adds 8 MiB for 1024 connections and 4 MiB per worker for items in flight, keeps headroom
# (a quarter of a small limit) and wants at least 1 MiB of items (docs/memory.md). One
# worker fits in 56 MiB: 64Mi, memcached's default size, is the floor. With -t N, N worker
# processes and their supervisor count: 64Mi + 40Mi per worker covers them.
MIN_MEMORY_MIB = 64
MEMORY_MIB_PER_EXTRA_WORKER = 40
MAX_NAME_LENGTH = 40  # leaves room for "-p7", "-headless" and the pods' revision-hash labels
NAME_RE = "^[a-z]([-a-z0-9]*[a-z0-9])?$"


@dataclass(frozen=True)
class Rule:
    """One rule: `holds` (Python) and `cel` (CEL, `self` = the object at `scope`) must agree."""

    id: str
    scope: str  # "spec" or "root" (the whole object)
    field: str  # path of the offending field, relative to the scope
    reason: str
    message: str
    cel: str
    holds: Callable[[Any], bool]
    # A spec (and name) that breaks this rule and no other: for the tests, and for anyone
    # checking that an API server rejects what the operator rejects.
    example_spec: dict[str, Any]
    example_name: str = "demo"

    @property
    def field_path(self) -> str:
        """The rule's field as the API server reports it (relative to the rule's node)."""
        return "." + self.field

    @property
    def full_field(self) -> str:
        return self.field if self.scope == "root" else f"{self.scope}.{self.field}"


def _q(value: int | str) -> Decimal:
    return to_decimal(value)


def _cel_q(path: str) -> str:
    # int-or-string fields are dyn in CEL; string() makes both forms acceptable to quantity().
    return f"quantity(string({path}))"


# Whole cores are written as digits (2, "2"): the CEL quantity library calls "2000m" a
# non-integer, so both halves of the rule accept exactly the plain-integer spellings.
WHOLE_CORES_RE = "^[0-9]+$"


def _whole(value: int | str) -> bool:
    return re.fullmatch(WHOLE_CORES_RE, str(value)) is not None


def _pinned_workers_fit(s: CacheClusterSpec) -> bool:
    if not s.pinning or not _whole(s.resources.cpu):
        return True  # the whole-cores rule reports this case
    return s.workers <= int(str(s.resources.cpu))


def _metrics_port_apart(s: CacheClusterSpec) -> bool:
    # Only a port set by hand can meet the workers' (the derived one is 10000 away).
    port = s.monitoring.port
    return not s.monitoring.enabled or port is None or not (s.port <= port < s.port + s.workers)


def _derived_metrics_port_cel() -> str:
    # models.derived_metrics_port, in CEL.
    return (
        "(has(self.monitoring.port) ? self.monitoring.port : "
        "(self.port + 10000 <= 65535 ? self.port + 10000 : self.port - 10000))"
    )


def _plaintext_apart(s: CacheClusterSpec) -> bool:
    if s.tls is None or s.tls.plaintext_port is None:
        return True
    plain = s.tls.plaintext_port
    return plain + s.workers <= s.port or plain >= s.port + s.workers


def _plaintext_apart_from_metrics(s: CacheClusterSpec) -> bool:
    if s.tls is None or s.tls.plaintext_port is None or not s.monitoring.enabled:
        return True
    plain = s.tls.plaintext_port
    return not plain <= s.metrics_port < plain + s.workers


def min_memory_mib(workers: int) -> int:
    """The least resources.memory (MiB) the server starts in, with `workers` workers."""
    return (
        MIN_MEMORY_MIB if workers == 1 else MIN_MEMORY_MIB + MEMORY_MIB_PER_EXTRA_WORKER * workers
    )


def _no_owned_flags(s: CacheClusterSpec) -> bool:
    return not any(re.search(OWNED_FLAGS_RE, arg) for arg in s.extra_args)


SPEC_RULES: tuple[Rule, ...] = (
    Rule(
        id="partitions-need-partition-strategy",
        scope="spec",
        field="placement.partitions",
        reason=FORBIDDEN,
        message="placement.partitions is only allowed when placement.strategy is partition",
        cel="!has(self.placement.partitions) || self.placement.strategy == 'partition'",
        holds=lambda s: s.placement.partitions is None or s.placement.strategy == "partition",
        example_spec={"placement": {"strategy": "spread", "partitions": 3}},
    ),
    Rule(
        id="partition-strategy-needs-partitions",
        scope="spec",
        field="placement.partitions",
        reason=REQUIRED,
        message="placement.partitions (1 to 7) is required when placement.strategy is partition",
        cel="self.placement.strategy != 'partition' || has(self.placement.partitions)",
        holds=lambda s: s.placement.strategy != "partition" or s.placement.partitions is not None,
        example_spec={"placement": {"strategy": "partition"}},
    ),
    Rule(
        id="spread-level-needs-spread-strategy",
        scope="spec",
        field="placement.spreadLevel",
        reason=FORBIDDEN,
        message="placement.spreadLevel is only allowed when placement.strategy is spread",
        cel="!has(self.placement.spreadLevel) || self.placement.strategy == 'spread'",
        holds=lambda s: s.placement.spread_level is None or s.placement.strategy == "spread",
        example_spec={"placement": {"strategy": "cluster", "spreadLevel": "rack"}},
    ),
    Rule(
        id="max-per-zone-needs-spread-strategy",
        scope="spec",
        field="placement.maxPerZone",
        reason=FORBIDDEN,
        message="placement.maxPerZone is only allowed when placement.strategy is spread",
        cel="!has(self.placement.maxPerZone) || self.placement.strategy == 'spread'",
        holds=lambda s: s.placement.max_per_zone is None or s.placement.strategy == "spread",
        example_spec={"placement": {"strategy": "partition", "partitions": 2, "maxPerZone": 3}},
    ),
    Rule(
        id="fixed-memory-needs-size",
        scope="spec",
        field="memory.size",
        reason=REQUIRED,
        message="memory.size is required when memory.mode is fixed",
        cel="self.memory.mode != 'fixed' || has(self.memory.size)",
        holds=lambda s: s.memory.mode != "fixed" or s.memory.size is not None,
        example_spec={"memory": {"mode": "fixed"}},
    ),
    Rule(
        id="size-needs-fixed-memory",
        scope="spec",
        field="memory.size",
        reason=FORBIDDEN,
        message=(
            "memory.size is only allowed when memory.mode is fixed "
            "(mode auto sizes the cache from the container's memory limit)"
        ),
        cel="!has(self.memory.size) || self.memory.mode == 'fixed'",
        holds=lambda s: s.memory.size is None or s.memory.mode == "fixed",
        example_spec={"memory": {"size": "512Mi"}},
    ),
    Rule(
        id="memory-size-at-least-1Mi",
        scope="spec",
        field="memory.size",
        reason=INVALID,
        message="memory.size must be at least 1Mi (the server counts memory in MiB)",
        cel=(
            f"!has(self.memory.size) || "
            f"{_cel_q('self.memory.size')}.compareTo(quantity('1Mi')) >= 0"
        ),
        holds=lambda s: s.memory.size is None or _q(s.memory.size) >= MIB,
        example_spec={"memory": {"mode": "fixed", "size": "512Ki"}},
    ),
    Rule(
        id="memory-size-below-limit",
        scope="spec",
        field="memory.size",
        reason=INVALID,
        message="memory.size must be less than resources.memory, the container's memory limit",
        cel=(
            f"!has(self.memory.size) || {_cel_q('self.memory.size')}"
            f".isLessThan({_cel_q('self.resources.memory')})"
        ),
        holds=lambda s: s.memory.size is None or _q(s.memory.size) < _q(s.resources.memory),
        example_spec={"resources": {"memory": "1Gi"}, "memory": {"mode": "fixed", "size": "1Gi"}},
    ),
    Rule(
        id="memory-headroom-below-limit",
        scope="spec",
        field="memory.headroom",
        reason=INVALID,
        message=(
            "memory.headroom must be less than resources.memory, the container's memory limit"
        ),
        cel=(
            f"!has(self.memory.headroom) || {_cel_q('self.memory.headroom')}"
            f".isLessThan({_cel_q('self.resources.memory')})"
        ),
        holds=lambda s: s.memory.headroom is None or _q(s.memory.headroom) < _q(s.resources.memory),
        example_spec={"resources": {"memory": "256Mi"}, "memory": {"headroom": "300Mi"}},
    ),
    Rule(
        id="memory-limit-fits-the-server",
        scope="spec",
        field="resources.memory",
        reason=INVALID,
        message=(
            f"resources.memory must be at least {MIN_MEMORY_MIB}Mi, and with more than one "
            f"worker {MIN_MEMORY_MIB}Mi + {MEMORY_MIB_PER_EXTRA_WORKER}Mi per worker: each "
            "server process takes about 29 MiB at start, plus 8 MiB for 1024 connections, "
            "4 MiB per worker for items in flight, headroom, and room for items"
        ),
        # quantity() of a string built at run time costs the API server's estimate too
        # much; adding bytes to a constant quantity does not.
        cel=(
            f"{_cel_q('self.resources.memory')}.compareTo(quantity('{MIN_MEMORY_MIB}Mi')"
            f".add(self.workers == 1 ? 0 : {MEMORY_MIB_PER_EXTRA_WORKER * MIB} * self.workers)"
            ") >= 0"
        ),
        holds=lambda s: _q(s.resources.memory) >= min_memory_mib(s.workers) * MIB,
        example_spec={"resources": {"memory": "48Mi"}},
    ),
    Rule(
        id="cpu-positive",
        scope="spec",
        field="resources.cpu",
        reason=INVALID,
        message="resources.cpu must be more than 0",
        cel=f"{_cel_q('self.resources.cpu')}.isGreaterThan(quantity('0'))",
        holds=lambda s: _q(s.resources.cpu) > 0,
        example_spec={"pinning": False, "resources": {"cpu": "0"}},
    ),
    Rule(
        id="pinning-needs-whole-cores",
        scope="spec",
        field="resources.cpu",
        reason=INVALID,
        message=(
            "resources.cpu must be a whole number of cores, written as an integer such as 2 "
            "(not 1500m or 2000m), when pinning is on: the kubelet's static CPU manager gives "
            "exclusive cores only to integer requests"
        ),
        cel=f"!self.pinning || string(self.resources.cpu).matches('{WHOLE_CORES_RE}')",
        holds=lambda s: not s.pinning or _whole(s.resources.cpu),
        example_spec={"resources": {"cpu": "1500m"}},
    ),
    Rule(
        id="pinned-workers-fit-cores",
        scope="spec",
        field="workers",
        reason=INVALID,
        message=(
            "workers must not exceed resources.cpu when pinning is on: "
            "each worker is pinned to a core of its own"
        ),
        cel=(
            f"!self.pinning || !string(self.resources.cpu).matches('{WHOLE_CORES_RE}') || "
            "self.workers <= int(string(self.resources.cpu))"
        ),
        holds=_pinned_workers_fit,
        example_spec={"resources": {"cpu": 2}, "workers": 3},
    ),
    Rule(
        id="tcp-ports-in-range",
        scope="spec",
        field="port",
        reason=INVALID,
        message="port + workers - 1 must be at most 65535: worker i listens on TCP port + i",
        cel="self.port + self.workers - 1 <= 65535",
        holds=lambda s: s.port + s.workers - 1 <= 65535,
        example_spec={"pinning": False, "port": 65535, "workers": 2},
    ),
    Rule(
        id="udp-ports-in-range",
        scope="spec",
        field="udp.port",
        reason=INVALID,
        message=(
            "udp.port + workers - 1 must be at most 65535: worker i listens on UDP udp.port + i"
        ),
        cel=(
            "!self.udp.enabled || "
            "(has(self.udp.port) ? self.udp.port : self.port) + self.workers - 1 <= 65535"
        ),
        holds=lambda s: not s.udp.enabled or s.udp_port + s.workers - 1 <= 65535,
        example_spec={"pinning": False, "udp": {"enabled": True, "port": 65535}, "workers": 2},
    ),
    Rule(
        id="metrics-port-apart-from-workers",
        scope="spec",
        field="monitoring.port",
        reason=INVALID,
        message=(
            "monitoring.port must differ from the workers' TCP ports (port to port + workers - 1)"
        ),
        cel=(
            "!self.monitoring.enabled || !has(self.monitoring.port) || "
            "self.monitoring.port < self.port || self.monitoring.port >= self.port + self.workers"
        ),
        holds=_metrics_port_apart,
        example_spec={"monitoring": {"port": 11211}},
    ),
    Rule(
        id="auth-forbids-udp",
        scope="spec",
        field="udp.enabled",
        reason=FORBIDDEN,
        message=(
            "udp.enabled must be false when auth is set: UDP cannot carry memcached's "
            "authentication (the server refuses to start with both, as memcached does)"
        ),
        cel="!has(self.auth) || !self.udp.enabled",
        holds=lambda s: s.auth is None or not s.udp.enabled,
        example_spec={"auth": {"secretName": "cache-credentials"}, "udp": {"enabled": True}},
    ),
    Rule(
        id="tls-only-forbids-udp",
        scope="spec",
        field="udp.enabled",
        reason=FORBIDDEN,
        message=(
            "udp.enabled must be false when tls is set without tls.plaintextPort: UDP is "
            "plaintext, and a cluster without a plaintext port promises none"
        ),
        cel="!has(self.tls) || has(self.tls.plaintextPort) || !self.udp.enabled",
        holds=lambda s: s.tls is None or s.tls.plaintext_port is not None or not s.udp.enabled,
        example_spec={"tls": {"secretName": "cache-tls"}, "udp": {"enabled": True}},
    ),
    Rule(
        id="plaintext-ports-in-range",
        scope="spec",
        field="tls.plaintextPort",
        reason=INVALID,
        message=(
            "tls.plaintextPort + workers - 1 must be at most 65535: worker i listens on "
            "plaintextPort + i"
        ),
        cel=(
            "!has(self.tls) || !has(self.tls.plaintextPort) || "
            "self.tls.plaintextPort + self.workers - 1 <= 65535"
        ),
        holds=lambda s: (
            s.tls is None
            or s.tls.plaintext_port is None
            or s.tls.plaintext_port + s.workers - 1 <= 65535
        ),
        example_spec={
            "pinning": False,
            "workers": 2,
            "tls": {"secretName": "cache-tls", "plaintextPort": 65535},
        },
    ),
    Rule(
        id="plaintext-ports-apart-from-workers",
        scope="spec",
        field="tls.plaintextPort",
        reason=INVALID,
        message=(
            "tls.plaintextPort to plaintextPort + workers - 1 must not meet the workers' TLS "
            "ports (port to port + workers - 1)"
        ),
        cel=(
            "!has(self.tls) || !has(self.tls.plaintextPort) || "
            "self.tls.plaintextPort + self.workers <= self.port || "
            "self.tls.plaintextPort >= self.port + self.workers"
        ),
        holds=_plaintext_apart,
        example_spec={"tls": {"secretName": "cache-tls", "plaintextPort": 11211}},
    ),
    Rule(
        id="plaintext-ports-apart-from-metrics",
        scope="spec",
        field="tls.plaintextPort",
        reason=INVALID,
        message=(
            "tls.plaintextPort to plaintextPort + workers - 1 must not meet the metrics port "
            "(monitoring.port, or port + 10000 when unset)"
        ),
        cel=(
            "!has(self.tls) || !has(self.tls.plaintextPort) || !self.monitoring.enabled || "
            f"{_derived_metrics_port_cel()} < self.tls.plaintextPort || "
            f"{_derived_metrics_port_cel()} >= self.tls.plaintextPort + self.workers"
        ),
        holds=_plaintext_apart_from_metrics,
        example_spec={"tls": {"secretName": "cache-tls", "plaintextPort": 21211}},
    ),
    Rule(
        id="secured-needs-monitoring",
        scope="spec",
        field="monitoring.enabled",
        reason=INVALID,
        message=(
            "monitoring.enabled must be true when auth or tls is set: the operator reads what "
            "each appliance reports about itself (CPUs, memory limit, warm restart) from "
            "/stats on the metrics port, because the memcached port then asks for "
            "credentials or TLS that the operator does not hold"
        ),
        cel="!(has(self.auth) || has(self.tls)) || self.monitoring.enabled",
        holds=lambda s: not s.secured or s.monitoring.enabled,
        example_spec={
            "auth": {"secretName": "cache-credentials"},
            "monitoring": {"enabled": False},
        },
    ),
    Rule(
        id="extra-args-leave-owned-flags",
        scope="spec",
        field="extraArgs",
        reason=FORBIDDEN,
        message=(
            "extraArgs must not set the flags the operator derives from the spec: "
            "-p/--port, -U/--udp-port, -l/--listen, -m/--memory-limit, --memory-headroom, "
            "-t/--workers, --pin, --metrics-port, -e/--memory-file, -Y/--auth-file, "
            "-Z/--enable-ssl, -o/--extended, --ssl-*, -F/--disable-flush-all, --admin-socket"
        ),
        cel=f"!has(self.extraArgs) || self.extraArgs.all(a, !a.matches('{OWNED_FLAGS_RE}'))",
        holds=_no_owned_flags,
        example_spec={"extraArgs": ["-c", "4096", "-m", "64"]},
    ),
)

ROOT_RULES: tuple[Rule, ...] = (
    Rule(
        id="name-is-short-dns-label",
        scope="root",
        field="metadata.name",
        reason=INVALID,
        message=(
            f"metadata.name must be a DNS label of at most {MAX_NAME_LENGTH} characters "
            "(lower-case letters, digits and '-', starting with a letter): "
            "it names the StatefulSets, Services and pods"
        ),
        cel=(
            f"size(self.metadata.name) <= {MAX_NAME_LENGTH} && "
            f"self.metadata.name.matches('{NAME_RE}')"
        ),
        holds=lambda m: _valid_name(m.metadata.name),
        example_spec={},
        example_name="Cache.Main",
    ),
)

ALL_RULES: tuple[Rule, ...] = SPEC_RULES + ROOT_RULES


def _valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and re.fullmatch(NAME_RE, name) is not None


def broken_rules(rules: tuple[Rule, ...], obj: Any) -> list[Rule]:
    """The rules that `obj` breaks, in table order."""
    return [rule for rule in rules if not rule.holds(obj)]
