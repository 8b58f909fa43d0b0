"""The CacheCluster API (cache.appliance.io/v1alpha1) as pydantic models.

These models are the single source of the API: the CRD in crds/ is generated from them
(`python -m cacheoperator.crdgen crds/`), the operator validates every object with them, and
the builders read nothing but a validated `CacheClusterSpec`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError

from cacheoperator.quantity import Quantity
from cacheoperator.rules import ROOT_RULES, SPEC_RULES, Rule, broken_rules

GROUP = "cache.appliance.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CacheCluster"
PLURAL = "cacheclusters"
SINGULAR = "cachecluster"
SHORT_NAMES = ["cc"]

DEFAULT_PORT = 11211
# The metrics port follows the TCP port, so that CacheClusters that differ only in `port`
# can share nodes: port + 10000 (11211 -> 21211), or port - 10000 where that would pass
# 65535. Ten thousand is far beyond the 64 workers' TCP ports, so the derived port never
# meets the cluster's own; clusters whose ports are 10000 apart do meet (see PortConflict).
METRICS_PORT_OFFSET = 10000
DEFAULT_ZONE_KEY = "topology.kubernetes.io/zone"
# Kubernetes has no well-known rack label; this one is ours, documented in docs/operator.md.
DEFAULT_RACK_KEY = "topology.cache.appliance.io/rack"
DEFAULT_MAX_PER_ZONE = 7  # as EC2 spread placement groups: seven instances per zone
DEFAULT_SPREAD_LEVEL = "host"
MAX_PARTITIONS = 7  # as EC2 partition placement groups
MAX_REPLICAS = 1000

Strategy = Literal["cluster", "spread", "partition"]
Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Invalid"]

# Ports below 1024 need CAP_NET_BIND_SERVICE, which the non-root pods do not have.
Port = Annotated[int, Field(ge=1024, le=65535)]
LabelKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=317,
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
    ),
]


class _Model(BaseModel):
    """camelCase in YAML, snake_case in Python, and no unknown fields (typos fail loudly)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        frozen=True,
    )


def derived_metrics_port(port: int) -> int:
    """The metrics port of a cluster whose spec names none, from its TCP port."""
    return (
        port + METRICS_PORT_OFFSET
        if port + METRICS_PORT_OFFSET <= 65535
        else port - METRICS_PORT_OFFSET
    )


class Udp(_Model):
    """memcached's UDP protocol (8-byte frame header); off unless enabled, as in memcached."""

    enabled: bool = Field(False, description="Serve the UDP protocol too.")
    port: Port | None = Field(
        None,
        description=(
            "UDP port of worker 0 (worker i uses port + i); the TCP port when unset, "
            "as in memcached."
        ),
    )


SecretName = Annotated[
    str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
]
SecretKey = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
CLIENT_CERTIFICATES = ("none", "optional", "required")


class Auth(_Model):
    """memcached's text-protocol authentication (cacheserver -Y): a client's first request
    is `set <any key> 0 0 <bytes>` with `<user> <password>` as its data; until then every
    request is refused. The credentials come from a Secret mounted as a volume, so a changed
    Secret reaches the appliances without a restart."""

    secret_name: SecretName = Field(
        description="Secret (in the cluster's namespace) holding the credentials file."
    )
    key: SecretKey = Field(
        "credentials",
        description="Key of the Secret with the credentials, one user:password per line.",
    )


class Tls(_Model):
    """memcached's TLS (cacheserver -Z) on the workers' ports, from a Secret in the layout
    cert-manager writes: tls.crt (the chain), tls.key, and ca.crt for client certificates.
    Mounted as a volume: a renewed certificate is served without a restart."""

    secret_name: SecretName = Field(description="Secret with tls.crt, tls.key and ca.crt.")
    client_certificates: Literal["none", "optional", "required"] = Field(
        "none",
        description=(
            "Mutual TLS: none (not asked for), optional (checked against ca.crt when sent), "
            "required (a client without one signed by ca.crt is refused)."
        ),
    )
    plaintext_port: Port | None = Field(
        None,
        description=(
            "A plaintext TCP port next to TLS (worker i uses plaintextPort + i), memcached's "
            "notls: listener; none when unset."
        ),
    )

    @property
    def verify_mode(self) -> int:
        """memcached's ssl_verify_mode: 0 none, 1 request, 2 require."""
        return CLIENT_CERTIFICATES.index(self.client_certificates)


class Resources(_Model):
    """Requests and limits of the cache container; always equal, so the pod's QoS is Guaranteed."""

    cpu: Quantity = Field(
        1, description='CPU cores (a whole number when pinning is on), e.g. 2 or "500m".'
    )
    memory: Quantity = Field("1Gi", description='Memory limit of the container, e.g. "4Gi".')


class Memory(_Model):
    """How much of the container's memory the cache may use."""

    mode: Literal["auto", "fixed"] = Field(
        "auto",
        description=(
            "auto: the server sizes its cache from its own cgroup limit (-m auto); "
            "fixed: a set size."
        ),
    )
    size: Quantity | None = Field(
        None, description='Cache size for mode fixed (below resources.memory), e.g. "900Mi".'
    )
    headroom: Quantity | None = Field(
        None,
        description=(
            "Memory kept free for the server itself (connections, buffers); "
            "the server's default when unset."
        ),
    )


class Placement(_Model):
    """Where pods go, after EC2 placement groups."""

    strategy: Strategy = Field(
        "spread",
        description=(
            "cluster: pack into one zone, preferably one rack; "
            "spread: distinct hosts (or racks), at most maxPerZone per zone; "
            "partition: `partitions` groups that never share a rack."
        ),
    )
    partitions: int | None = Field(
        None,
        ge=1,
        le=MAX_PARTITIONS,
        description="Number of partitions (1 to 7); strategy partition only.",
    )
    spread_level: Literal["host", "rack"] | None = Field(
        None, description="What spread pods never share: host (default) or rack; spread only."
    )
    max_per_zone: int | None = Field(
        None,
        ge=1,
        le=100,
        description=f"Most pods per zone (default {DEFAULT_MAX_PER_ZONE}); spread only.",
    )
    zone_key: LabelKey = Field(DEFAULT_ZONE_KEY, description="Node label naming the zone.")
    rack_key: LabelKey = Field(DEFAULT_RACK_KEY, description="Node label naming the rack.")

    @property
    def effective_spread_level(self) -> str:
        return self.spread_level or DEFAULT_SPREAD_LEVEL

    @property
    def effective_max_per_zone(self) -> int:
        return self.max_per_zone or DEFAULT_MAX_PER_ZONE

    @property
    def partition_count(self) -> int:
        """StatefulSets to run: one per partition, or one for cluster and spread."""
        return (self.partitions or 1) if self.strategy == "partition" else 1


class Toleration(_Model):
    """A pod toleration, as in the Pod API."""

    key: str | None = Field(None, max_length=317)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Monitoring(_Model):
    """The server's Prometheus endpoint (/metrics), scraped through pod annotations."""

    enabled: bool = Field(True, description="Serve /metrics.")
    port: Port | None = Field(
        None,
        description=(
            f"TCP port of /metrics; when unset, spec.port + {METRICS_PORT_OFFSET} "
            f"(spec.port - {METRICS_PORT_OFFSET} above {65535 - METRICS_PORT_OFFSET})."
        ),
    )


DEFAULT_WARM_RESTART_PATH = "/dev/shm/cache-appliance"


class WarmRestart(_Model):
    """Keep each appliance's cache through a restart of its pod (a rollout, an upgrade): the
    server saves its items to node-local memory on SIGTERM and restores them at start."""

    enabled: bool = Field(
        True,
        description=("Save the cache on a graceful stop and restore it at start (cacheserver -e)."),
    )
    host_path: str = Field(
        DEFAULT_WARM_RESTART_PATH,
        min_length=2,
        max_length=200,
        pattern=r"^(/[A-Za-z0-9_-][A-Za-z0-9._-]*)+$",
        description=(
            "Directory on each node, on memory (tmpfs), under which every appliance keeps its "
            "snapshot in <namespace>/<cluster>/<pod>."
        ),
    )


class Rollout(_Model):
    """How a change of the pod template goes through the appliances: one at a time."""

    progress_deadline_seconds: int | None = Field(
        None,
        ge=30,
        le=86400,
        description=(
            "Seconds a rollout step may go without progress (an appliance ready on the new "
            "spec, or the restore reports of the last one) before the operator goes on with "
            "the next StatefulSet and says so; unset, 600 or, with warm restart, twice the "
            "grace period plus 120 if that is longer."
        ),
    )


class CacheClusterSpec(_Model):
    """Desired state of a CacheCluster."""

    replicas: int = Field(
        3, ge=0, le=MAX_REPLICAS, description="Pods in all (divided among the partitions)."
    )
    image: str | None = Field(
        None,
        min_length=1,
        max_length=512,
        description="Server image; the operator's default image when unset.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Pull policy of the server image."
    )
    port: Port = Field(DEFAULT_PORT, description="TCP port of worker 0 (worker i uses port + i).")
    udp: Udp = Field(default_factory=Udp, json_schema_extra={"default": {}})
    resources: Resources = Field(default_factory=Resources, json_schema_extra={"default": {}})
    memory: Memory = Field(default_factory=Memory, json_schema_extra={"default": {}})
    pinning: bool = Field(
        True,
        description=(
            "Pin each worker to a CPU of the pod's cpuset; needs whole cores so that the "
            "kubelet's static CPU manager gives the pod exclusive ones."
        ),
    )
    host_network: bool = Field(
        True,
        description=(
            "Run on the node's network (one appliance per node per port), "
            "with dnsPolicy ClusterFirstWithHostNet."
        ),
    )
    placement: Placement = Field(default_factory=Placement, json_schema_extra={"default": {}})
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict,
        max_length=32,
        description="Node labels the pods require.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Taints the pods tolerate."
    )
    extra_args: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=list,
        max_length=32,
        description='More cacheserver flags, e.g. ["-c", "4096"].',
    )
    monitoring: Monitoring = Field(default_factory=Monitoring, json_schema_extra={"default": {}})
    warm_restart: WarmRestart = Field(
        default_factory=WarmRestart, json_schema_extra={"default": {}}
    )
    rollout: Rollout = Field(default_factory=Rollout, json_schema_extra={"default": {}})
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "Server processes per pod, one shard each (worker i serves port + i); "
            "each is published as its own endpoint."
        ),
    )
    auth: Auth | None = Field(
        None, description="Clients authenticate first (memcached -Y); off when unset."
    )
    tls: Tls | None = Field(None, description="TLS on the workers' ports (memcached -Z).")
    flush_all: bool = Field(
        True,
        description=(
            "Answer flush_all; false refuses it with CLIENT_ERROR flush_all not allowed "
            "(memcached -F)."
        ),
    )

    @property
    def udp_port(self) -> int:
        """UDP port of worker 0 (whether or not UDP is enabled)."""
        return self.udp.port if self.udp.port is not None else self.port

    @property
    def metrics_port(self) -> int:
        """TCP port of /metrics (whether or not monitoring is enabled)."""
        if self.monitoring.port is not None:
            return self.monitoring.port
        return derived_metrics_port(self.port)

    @property
    def secured(self) -> bool:
        """Whether the memcached port asks for credentials or TLS: then the probes use the
        admin socket and the operator reads the appliances' stats over HTTP."""
        return self.auth is not None or self.tls is not None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> CacheClusterSpec:
        _raise_broken(SPEC_RULES, self, title=type(self).__name__)
        return self


class Metadata(BaseModel):
    """The part of the object metadata the API has rules about."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    namespace: str | None = None


class CacheClusterManifest(BaseModel):
    """A whole CacheCluster object, as written in a manifest (status ignored)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        extra="ignore",
        frozen=True,
    )

    api_version: Literal["cache.appliance.io/v1alpha1"] = API_VERSION
    kind: Literal["CacheCluster"] = KIND
    metadata: Metadata
    spec: CacheClusterSpec

    @model_validator(mode="after")
    def _root_rules(self) -> CacheClusterManifest:
        _raise_broken(ROOT_RULES, self, title=type(self).__name__)
        return self


def _raise_broken(rules: tuple[Rule, ...], obj: Any, title: str) -> None:
    broken = broken_rules(rules, obj)
    if not broken:
        return
    # One error per rule, located at the rule's own field, so the message names that field.
    raise ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(
                type=PydanticCustomError(
                    "cross_field_rule", "{message}", {"message": rule.message, "rule": rule.id}
                ),
                loc=tuple(rule.field.split(".")),
                input=_lookup(obj, rule.field),
            )
            for rule in broken
        ],
    )


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if obj is None:
            return None
        fields = type(obj).model_fields if isinstance(obj, BaseModel) else {}
        name = next((n for n, f in fields.items() if f.alias == part or n == part), part)
        obj = getattr(obj, name, None)
    return obj


# ---- status ----------------------------------------------------------------------------


class _StatusModel(_Model):
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="ignore",
        frozen=True,
    )


class Condition(_StatusModel):
    """Ready, Progressing, Degraded or Pinned, with why."""

    type: Literal["Ready", "Progressing", "Degraded", "Pinned"]
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(max_length=128)
    message: str = Field(max_length=4096)
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    observed_generation: int | None = None


class Endpoint(_StatusModel):
    """One worker of one pod: what a client puts in its server list."""

    pod: str
    node: str | None = None
    address: str
    port: int
    udp_port: int | None = None
    worker: int
    partition: int | None = None
    zone: str | None = None
    rack: str | None = None
    # What the appliance reported about itself (absent until it has).
    cpus: str | None = Field(
        None,
        max_length=1024,
        description='CPUs this worker runs on, as Linux writes CPU lists ("1", "2-3").',
    )
    memory_limit: str | None = Field(
        None, max_length=64, description='The memory limit the appliance sized itself to ("1Gi").'
    )
    memory_limit_source: str | None = Field(
        None,
        max_length=1024,
        description="Where the appliance read that limit (its cgroup file, or env).",
    )

    # Reported by the appliances, not the membership: left out of the ConfigMap.
    REPORTED: ClassVar[frozenset[str]] = frozenset({"cpus", "memory_limit", "memory_limit_source"})


class DiscoveryNode(_StatusModel):
    """One endpoint as `config get cluster` lists it (host|ip|port)."""

    pod: str
    worker: int
    host: str = Field(description="Stable DNS name: <pod>.<name>-headless.<namespace>.svc.")
    address: str = Field(description="The pod's address (the node's, with hostNetwork).")
    port: int


class DiscoveryStatus(_StatusModel):
    """ElastiCache-style auto discovery: what every appliance answers to `config get cluster`."""

    endpoint: str = Field(
        description="One stable address for clients: the discovery Service, host:port."
    )
    version: int = Field(
        description="Membership version; goes up by one whenever the membership changes."
    )
    last_change_time: str | None = Field(
        None,
        description="When the membership last changed.",
        json_schema_extra={"format": "date-time"},
    )
    nodes: list[DiscoveryNode] = Field(
        default_factory=list,
        description="The membership in its stable order (partition, pod ordinal, worker).",
    )


class ApplianceStart(_StatusModel):
    """How one ready appliance's cache came through its last start (warm restart)."""

    pod: str
    node: str | None = None
    started_at: str | None = Field(None, description="When its server container started.")
    warm_restart: Literal["restored", "none", "refused", "unknown"] = Field(
        description=(
            "restored: from its snapshot; none: there was no snapshot (first start, a new "
            "node, or no graceful stop); refused: its snapshot did not check out and it "
            "started empty; unknown: the operator could not ask it."
        )
    )
    restored_items: int | None = None
    reason: str | None = Field(None, description="Why the snapshot was refused.")
    previous_node: str | None = Field(
        None,
        description=(
            "Where the pod of this name ran before, when that was another node: its "
            "snapshot stayed there, and it started here without it."
        ),
    )


class LastNode(_StatusModel):
    """The node where one appliance last ran ready: where its snapshot is, and where a new
    pod of the same name is steered back to (warm restart)."""

    pod: str
    node: str
    uid: str | None = Field(
        None, description="The pod that ran there; a new pod of the same name is a new start."
    )
    previous_node: str | None = Field(
        None,
        description=(
            "Where the pod before it ran, when that was another node (drained, lost, or "
            "full): this one started without its snapshot."
        ),
    )


class RolloutStatus(_StatusModel):
    """Where a rollout of the pod template is (rollout.py)."""

    replicas: int = Field(description="Appliances the spec asks for.")
    updated_replicas: int = Field(
        description="Appliances that run the current pod template and are ready."
    )
    statefulset: str | None = Field(
        None,
        max_length=253,
        description=(
            "The StatefulSet the rollout is at: the one replacing its pods, or the one whose "
            "appliances' restore reports the next one waits for."
        ),
    )
    waiting_for: Literal["pods", "restores"] | None = Field(
        None,
        description=(
            "pods: its pods to run the new template and be ready; restores: its new "
            "appliances to report what they restored."
        ),
    )
    since: str | None = Field(
        None,
        description="When that wait began, or last made progress.",
        json_schema_extra={"format": "date-time"},
    )
    deadline_seconds: int | None = Field(
        None, description="How long a step may go without progress before the rollout goes on."
    )
    held: list[Annotated[str, Field(max_length=253)]] = Field(
        default_factory=list,
        max_length=16,
        description="StatefulSets whose new template waits for that one.",
    )
    timed_out: list[Annotated[str, Field(max_length=253)]] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "StatefulSets that went past the deadline without finishing: the rollout went on "
            "without them."
        ),
    )


class CacheClusterStatus(_StatusModel):
    """Observed state of a CacheCluster, written by the operator."""

    phase: Phase | None = None
    replicas: int | None = Field(None, description="Pods that exist.")
    ready_replicas: int | None = Field(None, description="Pods that are ready.")
    observed_generation: int | None = None
    selector: str | None = Field(None, description="Label selector of the pods (scale).")
    conditions: list[Condition] = Field(default_factory=list)
    endpoints: list[Endpoint] = Field(
        default_factory=list,
        description="Ready endpoints, one per worker: hash keys across all of them.",
    )
    discovery: DiscoveryStatus | None = None
    appliances: list[ApplianceStart] = Field(
        default_factory=list,
        description="Each ready appliance's last start: what it restored (warm restart).",
    )
    last_nodes: list[LastNode] = Field(
        default_factory=list,
        description=(
            "With warm restart, the node each appliance last ran on, kept while its pod is "
            "replaced: the operator steers the new pod back there, to its snapshot."
        ),
    )
    rollout: RolloutStatus | None = Field(
        None, description="Where a rollout of the pod template is; its progress when none runs."
    )


# ---- validation entry points -------------------------------------------------------------


def field_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem, each starting with the full path of the field, e.g.
    "spec.placement.partitions: Input should be less than or equal to 7"."""
    lines = []
    for error in exc.errors(include_url=False):
        path = prefix
        for part in error["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            else:
                path += f".{part}" if path else str(part)
        # pydantic prefixes messages from our own checks with "Value error, "; drop it.
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{path or '(object)'}: {message}")
    return lines


class InvalidSpec(ValueError):
    """A CacheCluster the operator cannot run; `problems` name the fields."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def rule_example(rule: Rule) -> dict[str, Any]:
    """A whole CacheCluster manifest that breaks `rule` alone: an API server with the CRD
    installed must refuse it, naming the rule's field."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": rule.example_name},
        "spec": rule.example_spec,
    }


def parse_spec(name: str, spec: Any) -> CacheClusterSpec:
    """Validate a stored object's name and spec; raise InvalidSpec naming every bad field."""
    try:
        manifest = CacheClusterManifest.model_validate(
            {"metadata": {"name": name}, "spec": spec or {}}
        )
    except ValidationError as exc:
        raise InvalidSpec(field_errors(exc)) from None
    return manifest.spec
