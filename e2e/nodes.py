"""Real Kubernetes nodes on one machine: a kubelet, a containerd (with runc and the CNI
plugins) and a kube-proxy per node, each node in a network namespace of its own.

The host side is one Linux bridge. Every node is a network namespace joined to it by a veth
pair, with an address of its own on the bridge's subnet (not loopback: the API server refuses
loopback addresses in Endpoints), zone and rack labels, the static CPU manager with CPU 0
reserved, and a small pod network (the CNI ``ptp`` plugin: routed, no bridge inside the node)
for pods that are not hostNetwork. The host routes each node's pod range to that node, and the
nodes route to one another's; no namespace gets a default route, so nothing a pod sends can
leave the machine. The API server listens on the bridge's own address, which pods reach
through the ``kubernetes`` Service (kube-proxy in each node's namespace).

Addresses come from 198.18.0.0/15, the range set aside for testing network equipment:
nodes are ``198.18.<s>.<10+i>``, node i's pods ``198.19.<s>.<32*i>/27``, where ``s`` is
random per cluster so two clusters on one machine do not collide.

Every node process (containerd and its shims, kubelet, kube-proxy, the pods' containers)
runs under the node's own cgroup tree, so stopping a node is: SIGTERM and then SIGKILL
whatever is in that tree, unmount what the node mounted, remove its cgroups, its namespace
and its veth. Host settings the kubelet changes (a few sysctls) are saved when the first
node starts and put back when the last one stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2e import procs
from e2e.base import ClusterError, binary, cni_dir, wait_for
from e2e.pki import SERVICE_CIDR

ZONE_LABEL = "topology.kubernetes.io/zone"
RACK_LABEL = "topology.cache.appliance.io/rack"
HOSTNAME_LABEL = "kubernetes.io/hostname"
NETWORK_PREFIX = "198.18"
POD_PREFIX = "198.19"
# Where short-lived runtime state lives: unix socket paths must stay under 108 bytes.
RUN_ROOT = Path("/run/cache-e2e")
CGROUP_FS = Path("/sys/fs/cgroup")
# Machine-wide settings the nodes change: the kubelet sets the first six when it starts
# (setupKernelTunables); the inotify limits are raised before the nodes start (each kubelet
# and containerd takes inotify instances; the default 128 per user runs out at about ten
# nodes, and cAdvisor, then the kubelet, fails with "too many open files"). All are saved
# before the first node starts and put back after the last one stops.
HOST_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "fs/inotify/max_user_instances",
    "fs/inotify/max_user_watches",
)
INOTIFY_AT_LEAST = {"fs/inotify/max_user_instances": 8192, "fs/inotify/max_user_watches": 524288}
SANDBOX_IMAGE = "registry.k8s.io/pause:3.10.2"
# On a node whose CPUs every pod shares (cpuManagerPolicy none), for the tests that need one:
# only pods that tolerate it go there.
SHARED_CPUS_TAINT = {
    "key": "e2e.cache.appliance.io/shared-cpus",
    "value": "true",
    "effect": "NoSchedule",
}
MAX_NODES = 16  # 198.19.<s>.0/24 cut into one /28 of pod addresses per node
KUBELET_FIXED_DIR = Path("/var/lib/kubelet")


class NodeError(RuntimeError):
    pass


def run(*argv: str, netns: str | None = None, check: bool = True, timeout: float = 60) -> str:
    if netns:
        argv = ("ip", "netns", "exec", netns, *argv)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise NodeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


@dataclass
class NodeSpec:
    name: str
    index: int  # 1-based
    zone: str
    rack: str
    labels: dict[str, str] = field(default_factory=dict)
    # "static": exclusive CPUs for Guaranteed integer-CPU containers; "none": every pod
    # shares every CPU (what a kubelet does unless told otherwise).
    cpu_manager_policy: str = "static"
    taints: list[dict[str, str]] = field(default_factory=list)

    def all_labels(self) -> dict[str, str]:
        return {ZONE_LABEL: self.zone, RACK_LABEL: self.rack, **self.labels}


def default_nodes(count: int, zones: int, racks_per_zone: int = 2) -> list[NodeSpec]:
    """``count`` nodes dealt round-robin over ``zones`` zones (zone-a, zone-b, ...) and, within
    a zone, over ``racks_per_zone`` racks (rack-a1, rack-a2, ...)."""
    if not 1 <= count <= MAX_NODES or not 1 <= zones <= 26:
        raise ValueError(f"1-{MAX_NODES} nodes (a /28 of pod addresses each) in 1-26 zones")
    nodes = []
    for i in range(count):
        zone = chr(ord("a") + i % zones)
        rack = (i // zones) % racks_per_zone + 1
        nodes.append(NodeSpec(f"node-{i + 1}", i + 1, f"zone-{zone}", f"rack-{zone}{rack}"))
    return nodes


# ---- the host side of the network ---------------------------------------------------------


@dataclass
class Network:
    """The bridge every node of one cluster hangs off, and the addresses derived from it."""

    subnet: int  # s in 198.18.<s>.0/24
    # Nodes start in parallel: their namespaces and routes are set up one at a time, each
    # routing to and from the nodes set up before it.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _ready: set[int] = field(default_factory=set, repr=False, compare=False)

    @classmethod
    def pick(cls) -> Network:
        used = run("ip", "-4", "-o", "addr", "show")
        for _ in range(100):
            s = random.randint(1, 254)
            if f"{NETWORK_PREFIX}.{s}." not in used:
                return cls(s)
        raise NodeError("no free 198.18.x.0/24 subnet on this machine")

    @property
    def tag(self) -> str:
        return f"ce{self.subnet}"

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    @property
    def host_ip(self) -> str:
        return f"{NETWORK_PREFIX}.{self.subnet}.1"

    @property
    def cidr(self) -> str:
        return f"{NETWORK_PREFIX}.{self.subnet}.0/24"

    @property
    def cluster_cidr(self) -> str:
        return f"{POD_PREFIX}.{self.subnet}.0/24"

    def node_ip(self, index: int) -> str:
        return f"{NETWORK_PREFIX}.{self.subnet}.{10 + index}"

    def pod_cidr(self, index: int) -> str:
        return f"{POD_PREFIX}.{self.subnet}.{16 * (index - 1)}/28"

    def netns(self, index: int) -> str:
        return f"{self.tag}-n{index}"

    def veth(self, index: int) -> str:
        return f"{self.tag}v{index}"

    def create(self) -> None:
        """The bridge with the host's address on it (the API server listens there)."""
        if Path(f"/sys/class/net/{self.bridge}").exists():
            return
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")

    def destroy(self) -> None:
        run("ip", "link", "del", self.bridge, check=False)

    def add_node(self, index: int, peers: Iterable[int]) -> None:
        """Node ``index``'s namespace, its veth on the bridge, and routes to its pods from
        this machine and from its ``peers`` (the other nodes), and from it to theirs."""
        with self._lock:
            self._add_node(index, [p for p in peers if p in self._ready])
            self._ready.add(index)

    def _add_node(self, index: int, peers: list[int]) -> None:
        ns, veth = self.netns(index), self.veth(index)
        if not Path(f"/run/netns/{ns}").exists():
            run("ip", "netns", "add", ns)
        if not Path(f"/sys/class/net/{veth}").exists():
            run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "link", "set", veth, "master", self.bridge, "up")
        run("ip", "addr", "replace", f"{self.node_ip(index)}/24", "dev", "eth0", netns=ns)
        run("ip", "link", "set", "lo", "up", netns=ns)
        run("ip", "link", "set", "eth0", "up", netns=ns)
        # The node forwards for its pods (ptp routes each pod through the node's namespace).
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", netns=ns)
        for other in peers:
            if other == index:
                continue
            run(
                "ip", "route", "replace", self.pod_cidr(other),
                "via", self.node_ip(other), netns=ns,
            )  # fmt: skip
            run(
                "ip", "route", "replace", self.pod_cidr(index),
                "via", self.node_ip(index), netns=self.netns(other),
            )  # fmt: skip
        run("ip", "route", "replace", self.pod_cidr(index), "via", self.node_ip(index))

    def remove_node(self, index: int) -> None:
        self._ready.discard(index)
        run("ip", "route", "del", self.pod_cidr(index), check=False)
        run("ip", "link", "del", self.veth(index), check=False)
        run("ip", "netns", "del", self.netns(index), check=False)


# ---- cgroups (v1 hierarchies, one controller each, or the unified v2 tree) -----------------


def cgroup_hierarchies() -> list[Path]:
    """The mounted cgroup hierarchies a node's tree must exist in."""
    if (CGROUP_FS / "cgroup.controllers").exists():
        return [CGROUP_FS]
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        # cgroup v1 hierarchies, and in hybrid mode the unified one beside them (runc makes
        # the containers' cgroups there too).
        if fstype in ("cgroup", "cgroup2"):
            found.append(Path(mount))
    return found


def make_cgroup(rel: str) -> None:
    """``rel`` (e.g. ``ce12-node-1``) in every hierarchy; cpuset gets its parent's CPUs."""
    for top in cgroup_hierarchies():
        path = top / rel
        path.mkdir(parents=True, exist_ok=True)
        if (top / "cpuset.cpus").exists() and top.name == "cpuset":
            for name in ("cpuset.cpus", "cpuset.mems"):
                f = path / name
                if not f.read_text().strip():
                    f.write_text((path.parent / name).read_text())
        if top == CGROUP_FS:  # v2: let the kubelet use the controllers below it
            controllers = (top / "cgroup.controllers").read_text().split()
            for d in (top, path):
                with contextlib.suppress(OSError):
                    (d / "cgroup.subtree_control").write_text(
                        " ".join(f"+{c}" for c in controllers)
                    )


def _cgroup_dirs(root: Path) -> list[Path]:
    """``root`` and every cgroup below it, deepest first. Cgroups come and go while this
    runs (the kubelet and runc remove theirs): what vanishes is skipped, never an error."""
    found = []
    for here, _dirs, _files in os.walk(root, topdown=False):  # os.walk ignores errors
        found.append(Path(here))
    return found


def cgroup_pids(rel: str) -> set[int]:
    pids: set[int] = set()
    for top in cgroup_hierarchies():
        for d in _cgroup_dirs(top / rel):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in (d / "cgroup.procs").read_text().split())
    return pids


def kill_cgroup(rel: str, grace: float = 5.0) -> None:
    """SIGTERM everything in the tree, then SIGKILL what is left; bounded."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        pids = cgroup_pids(rel)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while cgroup_pids(rel) and time.monotonic() < deadline:
            time.sleep(0.1)
    left = cgroup_pids(rel)
    if left:
        raise NodeError(f"processes {sorted(left)} in cgroup {rel} survived SIGKILL")


def remove_cgroup(rel: str) -> None:
    """Remove the tree depth first (a cgroup directory is removed with rmdir only)."""
    for top in cgroup_hierarchies():
        for d in _cgroup_dirs(top / rel):
            with contextlib.suppress(OSError):
                d.rmdir()


def _is_mount_point(path: Path) -> bool:
    target = str(path.resolve())
    return any(
        line.split()[1] == target for line in Path("/proc/self/mounts").read_text().splitlines()
    )


def unmount_under(*prefixes: Path) -> None:
    """Lazily unmount every mount point under the given directories, deepest first."""
    wanted = [str(p.resolve()) + "/" for p in prefixes]
    for _ in range(5):
        mounts = []
        for line in Path("/proc/self/mounts").read_text().splitlines():
            point = line.split()[1].encode().decode("unicode_escape")
            if any((point + "/").startswith(w) for w in wanted):
                mounts.append(point)
        if not mounts:
            return
        for point in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


# ---- one node -------------------------------------------------------------------------------


@dataclass
class NodePaths:
    """Where one node keeps its files: durable ones (logs, kubelet state) under the cluster's
    work directory, sockets and runtime state under a short path in /run."""

    work: Path
    run: Path

    @property
    def containerd_root(self) -> Path:
        return self.work / "containerd"

    @property
    def containerd_state(self) -> Path:
        return self.run / "containerd"

    @property
    def containerd_sock(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def kubelet_root(self) -> Path:
        # Its sockets (pod-resources, device and plugin registration) need a short path.
        return self.run / "kubelet"

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    @property
    def pod_logs(self) -> Path:
        return self.work / "pods"

    @property
    def cni_conf(self) -> Path:
        return self.work / "cni" / "net.d"

    @property
    def bin(self) -> Path:
        return self.work / "bin"

    @property
    def mount_ns(self) -> Path:
        """The node's mount namespace, kept by a bind mount of its /proc file here."""
        return self.run / "mnt"


@dataclass
class NodeBinaries:
    kubelet: str
    kube_proxy: str
    containerd: str
    shim: str
    ctr: str
    cni_dir: str
    runc: str

    @classmethod
    def find(cls) -> NodeBinaries:
        runc = shutil.which("runc") or "/usr/sbin/runc"
        if not os.access(runc, os.X_OK):
            raise NodeError("runc is not installed: make deps (scripts/bootstrap.sh) installs it")
        return cls(
            kubelet=str(binary("kubelet")),
            kube_proxy=str(binary("kube-proxy")),
            containerd=str(binary("containerd")),
            shim=str(binary("containerd-shim-runc-v2")),
            ctr=str(binary("ctr")),
            cni_dir=str(cni_dir()),
            runc=runc,
        )


def containerd_config(paths: NodePaths, bins: NodeBinaries, runc_root: Path) -> str:
    q = json.dumps  # TOML basic strings accept JSON's escapes for these paths
    cri = "plugins.'io.containerd.cri.v1.runtime'"
    return f"""\
version = 3
root = {q(str(paths.containerd_root))}
state = {q(str(paths.containerd_state))}
# NRI is off: nothing here uses it, and its socket would be shared by every node.
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = {q(str(paths.containerd_sock))}

[ttrpc]
  address = {q(str(paths.containerd_sock) + ".ttrpc")}

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = {q(SANDBOX_IMAGE)}

[{cri}]
  # This machine's bounding set lacks CAP_SYS_RESOURCE: no negative oom_score_adj.
  restrict_oom_score_adj = true
  # Pods' network namespaces under this node's state, not in the machine-wide /run/netns.
  netns_mounts_under_state_dir = true
  [{cri}.cni]
    bin_dirs = [{q(bins.cni_dir)}]
    conf_dir = {q(str(paths.cni_conf))}
  [{cri}.containerd]
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        BinaryName = {q(bins.runc)}
        Root = {q(str(runc_root))}
        SystemdCgroup = false
"""


def cni_config(network: Network, index: int, paths: NodePaths) -> str:
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "e2e-pods",
            "plugins": [
                {
                    "type": "ptp",
                    "ipMasq": False,
                    "mtu": 1500,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": network.pod_cidr(index)}]],
                        "routes": [
                            {"dst": network.cidr},
                            {"dst": network.cluster_cidr},
                            # Services: kube-proxy's DNAT in the node's namespace; the
                            # route must leave the pod first (no default route, on purpose).
                            {"dst": SERVICE_CIDR},
                        ],
                        "dataDir": str(paths.work / "cni" / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        },
        indent=2,
    )


def kubelet_config(
    spec: NodeSpec, address: str, paths: NodePaths, ca: Path, cgroup_root: str
) -> dict:
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": address,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": "/" + cgroup_root,
        "cgroupsPerQOS": True,
        # This machine mounts cgroup v1; kubelet 1.36 refuses it unless told otherwise.
        "failCgroupV1": False,
        "cpuManagerPolicy": spec.cpu_manager_policy,
        # The static policy keeps whole CPUs for the shared pool: 100m reserved rounds up to
        # one CPU (CPU 0 here), the other is handed out exclusively. Allocatable stays 1900m,
        # so a node takes a pinned 1-CPU appliance and small pods (the operator, helm test)
        # beside it, as a bigger machine would.
        "kubeReserved": {"cpu": "100m"},
        "containerRuntimeEndpoint": f"unix://{paths.containerd_sock}",
        "podLogsDir": str(paths.pod_logs),
        # ConfigMap and Secret volumes refresh within about this period.
        "syncFrequency": "5s",
        "nodeStatusUpdateFrequency": "10s",
        "nodeStatusReportFrequency": "30s",
        "failSwapOn": False,
        "resolvConf": "/etc/resolv.conf",
        # Every node shares this machine's disk and memory: evict only when really short,
        # and never garbage-collect the images imported at start (there is no registry).
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "shutdownGracePeriod": "0s",
        "serializeImagePulls": False,
        "containerLogMaxSize": "10Mi",
        "maxPods": 30,
    }
    if spec.taints:
        config["registerWithTaints"] = spec.taints
    return config


def kube_proxy_config(spec: NodeSpec, network: Network, kubeconfig: Path) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "hostnameOverride": spec.name,
        "clusterCIDR": network.cluster_cidr,
        "bindAddress": "0.0.0.0",
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # Leave the machine-wide conntrack table size and timeouts as they are.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }


@dataclass
class NodeState:
    """What `down` needs to find and stop one node from another program."""

    spec: NodeSpec
    address: str
    netns: str
    cgroup: str
    work: str
    run: str
    processes: list[dict] = field(default_factory=list)

    @classmethod
    def from_dict(cls, raw: dict) -> NodeState:
        raw = dict(raw)
        raw["spec"] = NodeSpec(**raw["spec"])
        return cls(**raw)


class Node:
    def __init__(
        self, spec: NodeSpec, network: Network, peers: list[int], work: Path, cluster
    ) -> None:
        self.spec = spec
        self.network = network
        self.peers = peers
        self.cluster = cluster
        self.address = network.node_ip(spec.index)
        self.netns = network.netns(spec.index)
        self.cgroup = f"{network.tag}-{spec.name}"
        self.paths = NodePaths(work, RUN_ROOT / network.tag / f"n{spec.index}")
        self.records: list[procs.ProcessRecord] = []

    def state(self) -> NodeState:
        return NodeState(
            self.spec,
            self.address,
            self.netns,
            self.cgroup,
            str(self.paths.work),
            str(self.paths.run),
            [r.to_dict() for r in self.records],
        )

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Start ``argv`` in the node's network namespace and its cgroup ``system``."""
        procs_files = [
            str(top / self.cgroup / "system" / "cgroup.procs") for top in cgroup_hierarchies()
        ]
        joins = "".join(f'echo $$ > "{f}"; ' for f in procs_files)
        enter = f"nsenter --mount={self.paths.mount_ns} --net=/run/netns/{self.netns}"
        wrapped = ["sh", "-c", f'{joins}exec {enter} "$@"', name, *argv]
        rec, _ = procs.start(name, wrapped, self.paths.logs / f"{name}.log", env=env)
        self.records.append(rec)

    def prepare(self, bins: NodeBinaries) -> None:
        p = self.paths
        for d in (p.work, p.run, p.logs, p.pod_logs, p.cni_conf, p.kubelet_root, p.bin):
            d.mkdir(parents=True, exist_ok=True)
        self.network.add_node(self.spec.index, self.peers)
        self._make_mount_namespace()
        make_cgroup(self.cgroup)
        make_cgroup(f"{self.cgroup}/system")
        runc_root = p.run / "runc"
        (p.work / "containerd.toml").write_text(containerd_config(p, bins, runc_root))
        (p.cni_conf / "10-e2e-pods.conflist").write_text(
            cni_config(self.network, self.spec.index, p)
        )
        # containerd finds its shim by name on PATH.
        shim = p.bin / "containerd-shim-runc-v2"
        with contextlib.suppress(FileNotFoundError):
            shim.unlink()
        shim.symlink_to(bins.shim)
        self.cluster.node_kubeconfig(self.spec.name)  # issued before the kubelet needs it

        (p.work / "kubelet.yaml").write_text(
            yaml.safe_dump(
                kubelet_config(self.spec, self.address, p, self.cluster.pki.ca_cert, self.cgroup)
            )
        )
        proxy_kubeconfig = self.cluster.kube_proxy_kubeconfig()
        (p.work / "kube-proxy.yaml").write_text(
            yaml.safe_dump(kube_proxy_config(self.spec, self.network, proxy_kubeconfig))
        )

    def _make_mount_namespace(self) -> None:
        """A mount namespace of the node's own (a slave of this machine's: it sees the host's
        mounts, the host does not see the node's), with a /dev/shm of its own: node-local
        memory, as each real machine has, for what pods keep there (warm-restart snapshots
        in hostPath volumes). The kubelet's and containerd's mounts stay inside it too."""
        ns = self.paths.mount_ns
        if ns.exists() and _is_mount_point(ns):
            return
        # The file that keeps a namespace must not be on a shared mount: make the node's run
        # directory a private mount of its own.
        run("mount", "--bind", str(self.paths.run), str(self.paths.run))
        run("mount", "--make-private", str(self.paths.run))
        ns.touch()
        run("unshare", f"--mount={ns}", "--propagation", "slave", "true")
        run(
            "nsenter", f"--mount={ns}", "mount", "-t", "tmpfs",
            "-o", "mode=1777,size=2g", f"shm-{self.spec.name}", "/dev/shm",
        )  # fmt: skip
        # The kubelet keeps its device-plugin socket at a fixed /var/lib/kubelet path, whatever
        # its root directory: give each node its own.
        KUBELET_FIXED_DIR.mkdir(parents=True, exist_ok=True)
        run(
            "nsenter", f"--mount={ns}", "mount", "-t", "tmpfs", "-o", "mode=0755,size=16m",
            f"kubelet-{self.spec.name}", str(KUBELET_FIXED_DIR),
        )  # fmt: skip

    def start_runtime(self, bins: NodeBinaries) -> None:
        p = self.paths
        env = {**os.environ, "PATH": f"{p.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        self._spawn(
            "containerd",
            [bins.containerd, "--config", str(p.work / "containerd.toml"), "--log-level", "warn"],
            env=env,
        )

        def serving() -> bool:
            self.ctr(bins, "version", timeout=5)  # raises until the server answers
            return True

        wait_for(f"containerd of {self.spec.name}", serving, 60, on_poll=self._check_alive)

    def ctr(self, bins: NodeBinaries, *args: str, check: bool = True, timeout: float = 300) -> str:
        return run(
            bins.ctr, "--address", str(self.paths.containerd_sock), "-n", "k8s.io", *args,
            check=check, timeout=timeout,
        )  # fmt: skip

    def import_images(self, bins: NodeBinaries, archives: Iterable[Path]) -> None:
        for archive in archives:
            self.ctr(bins, "images", "import", str(archive), check=True)

    def start_kubelet(self, bins: NodeBinaries) -> None:
        p = self.paths
        labels = ",".join(f"{k}={v}" for k, v in self.spec.all_labels().items())
        self._spawn(
            "kubelet",
            [
                bins.kubelet,
                f"--config={p.work / 'kubelet.yaml'}",
                f"--kubeconfig={self.cluster.node_kubeconfig(self.spec.name)}",
                f"--root-dir={p.kubelet_root}",
                # Its serving certificate; the default, /var/lib/kubelet/pki, is shared.
                f"--cert-dir={p.kubelet_root / 'pki'}",
                f"--hostname-override={self.spec.name}",
                f"--node-ip={self.address}",
                f"--node-labels={labels}",
                "--v=1",
            ],
        )
        self._spawn(
            "kube-proxy",
            [bins.kube_proxy, f"--config={p.work / 'kube-proxy.yaml'}", "--v=1"],
        )

    def _check_alive(self) -> None:
        for rec in self.records:
            if not rec.alive():
                raise NodeError(
                    f"{rec.name} of {self.spec.name} exited; last lines of {rec.log}:\n"
                    f"{rec.tail(20)}"
                )

    def alive(self) -> bool:
        return bool(self.records) and all(r.alive() for r in self.records)


def stop_node(state: NodeState, network: Network, grace: float = 10.0) -> None:
    """Everything of one node goes: its processes (pods included), mounts, cgroups, netns."""
    # The pods first, while containerd still runs (their shims exit with them), then the rest.
    kill_cgroup(state.cgroup, grace)
    work, run_dir = Path(state.work), Path(state.run)
    unmount_under(work, run_dir)
    remove_cgroup(state.cgroup)
    network.remove_node(state.spec.index)
    shutil.rmtree(run_dir, ignore_errors=True)


# ---- a set of nodes --------------------------------------------------------------------------


class Nodes:
    """The nodes of one cluster. ``start()`` brings them all up (in parallel) and waits for
    them to be Ready; ``stop()`` removes every trace. The state file lets `make down`, a
    different program, do the same."""

    def __init__(self, cluster, specs: list[NodeSpec], work: Path) -> None:
        self.cluster = cluster
        self.specs = specs
        self.work = work.resolve()
        self.network: Network = cluster.network
        self.state_file = self.work / "nodes.json"
        peers = [s.index for s in specs]
        self.nodes = [Node(s, self.network, peers, self.work / s.name, cluster) for s in specs]
        self.saved_sysctls: dict[str, str] = {}
        self._state_lock = threading.Lock()

    def save_state(self) -> None:
        with self._state_lock:  # the nodes start in parallel threads
            self.work.mkdir(parents=True, exist_ok=True)
            state = {
                "subnet": self.network.subnet,
                "sysctls": self.saved_sysctls,
                "nodes": [asdict(n.state()) for n in self.nodes],
            }
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=2))
            tmp.replace(self.state_file)

    def start(self, images: Iterable[Path], timeout: float = 180.0) -> Nodes:
        bins = NodeBinaries.find()
        sweep_stale(type(self.cluster).load)
        owner = RUN_ROOT / self.network.tag / "owner.json"
        owner.parent.mkdir(parents=True, exist_ok=True)
        owner.write_text(
            json.dumps({"nodes": str(self.state_file), "cluster": str(self.cluster.state_file)})
        )
        self.saved_sysctls = {k: Path("/proc/sys", k).read_text().strip() for k in HOST_SYSCTLS}
        for key, least in INOTIFY_AT_LEAST.items():
            if int(self.saved_sysctls[key]) < least:
                Path("/proc/sys", key).write_text(str(least))
        self.save_state()
        try:
            # Credentials first, one at a time: the nodes start in parallel.
            self.cluster.kube_proxy_kubeconfig()
            for spec in self.specs:
                self.cluster.node_kubeconfig(spec.name)
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                list(pool.map(lambda n: self._start_one(n, bins, images), self.nodes))
            self.save_state()
            wait_nodes_ready(self.cluster.api_client(), [s.name for s in self.specs], timeout)
        except BaseException:
            self.save_state()
            self.stop()
            raise
        return self

    def _start_one(self, node: Node, bins: NodeBinaries, images: list[Path]) -> None:
        node.prepare(bins)
        node.start_runtime(bins)
        self.save_state()
        node.import_images(bins, images)
        node.start_kubelet(bins)
        self.save_state()

    def alive(self) -> bool:
        return all(n.alive() for n in self.nodes)

    def add(self, spec: NodeSpec, images: Iterable[Path], timeout: float = 120.0) -> Node:
        """One more node joins the running cluster (Ready when this returns)."""
        if any(n.spec.index == spec.index or n.spec.name == spec.name for n in self.nodes):
            raise NodeError(f"{spec.name} (index {spec.index}) is taken")
        bins = NodeBinaries.find()
        peers = [n.spec.index for n in self.nodes] + [spec.index]
        node = Node(spec, self.network, peers, self.work / spec.name, self.cluster)
        self.nodes.append(node)
        self.cluster.node_kubeconfig(spec.name)
        self._start_one(node, bins, list(images))
        self.save_state()
        wait_nodes_ready(self.cluster.api_client(), [spec.name], timeout)
        return node

    def remove(self, name: str) -> None:
        """Stop a node (its pods first), remove its traces and its Node object."""
        from kubernetes import client

        node = self.node(name)
        stop_node(node.state(), self.network)
        self.nodes.remove(node)
        self.save_state()
        api = self.cluster.api_client()
        try:
            client.CoreV1Api(api).delete_node(name)
        finally:
            api.close()

    def failure_report(self, lines: int = 20) -> str:
        parts = []
        for n in self.nodes:
            for rec in n.records:
                state = "running" if rec.alive() else "EXITED"
                parts.append(f"--- {n.spec.name} {rec.name} ({state}):\n{rec.tail(lines)}")
        return "\n".join(parts)

    def stop(self) -> None:
        stop_from_state(self.state_file)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.spec.name == name)


def stop_from_state(state_file: Path) -> None:
    """Stop the nodes recorded in ``state_file`` and restore what the kubelets changed."""
    if not state_file.exists():
        return
    raw = json.loads(state_file.read_text())
    network = Network(raw["subnet"])
    states = [NodeState.from_dict(n) for n in raw["nodes"]]
    errors = []
    with ThreadPoolExecutor(max(1, len(states))) as pool:
        for result in pool.map(lambda s: _try(stop_node, s, network), states):
            if result:
                errors.append(result)
    for key, value in raw.get("sysctls", {}).items():
        with contextlib.suppress(OSError):
            Path("/proc/sys", key).write_text(value)
    shutil.rmtree(RUN_ROOT / network.tag, ignore_errors=True)
    # The mount point each node's own /var/lib/kubelet went on, if no one else uses it.
    with contextlib.suppress(OSError):
        KUBELET_FIXED_DIR.rmdir()
    state_file.unlink()
    if errors:
        raise NodeError("; ".join(errors))


def sweep_stale(load_cluster: Callable[[Path], Any]) -> None:
    """Remove the nodes of clusters whose control plane is gone (a test run that was killed
    before it could clean up): their processes, mounts, cgroups and network namespaces.
    ``load_cluster``: the control plane recorded in a state directory (LocalCluster.load),
    asked whether it is ``alive()`` and told to ``stop()``."""
    if not RUN_ROOT.is_dir():
        return
    for tag_dir in RUN_ROOT.iterdir():
        tag, owner = tag_dir.name, tag_dir / "owner.json"
        try:
            raw = json.loads(owner.read_text())
            nodes_state, cluster_state = Path(raw["nodes"]), Path(raw["cluster"])
            if cluster_state.exists() and load_cluster(cluster_state.parent).alive():
                continue
            if nodes_state.exists():
                stop_from_state(nodes_state)
            if cluster_state.exists():
                load_cluster(cluster_state.parent).stop()
        except (OSError, ValueError, KeyError, NodeError, ClusterError):
            pass
        sweep_tag(tag)


def sweep_tag(tag: str) -> None:
    """Whatever nodes of the cluster ``tag`` left with no state file to say so (its state
    directory was removed): processes in its cgroups, mounts under its run directory, its
    network namespaces and links, the run directory itself."""
    for top in cgroup_hierarchies():
        for root in top.glob(f"{tag}-*"):
            with contextlib.suppress(NodeError):
                kill_cgroup(root.name, grace=2.0)
            remove_cgroup(root.name)
    unmount_under(RUN_ROOT / tag)
    if Path("/run/netns").is_dir():
        for ns in Path("/run/netns").glob(f"{tag}-n*"):
            run("ip", "netns", "del", ns.name, check=False)
    for link in Path("/sys/class/net").glob(f"{tag}*"):
        run("ip", "link", "del", link.name, check=False)
    shutil.rmtree(RUN_ROOT / tag, ignore_errors=True)


def _try(fn, *args) -> str | None:
    try:
        fn(*args)
    except Exception as e:
        return str(e)
    return None


def wait_nodes_ready(api_client, names: Iterable[str], timeout: float) -> None:
    """Until every node is Ready and has none of the taints Kubernetes itself puts on nodes
    (node.kubernetes.io/not-ready and friends, which the node lifecycle controller removes),
    so the scheduler will place pods on it; taints a node registered with stay."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    wanted = set(names)
    last: dict[str, str] = {}

    def ready() -> bool:
        nodes = {n.metadata.name: n for n in core.list_node().items}
        for name in sorted(wanted):
            node = nodes.get(name)
            if node is None:
                last[name] = "not registered"
                continue
            conds = {c.type: c for c in node.status.conditions or []}
            taints = [
                t.key for t in node.spec.taints or [] if t.key.startswith("node.kubernetes.io/")
            ]
            ready_cond = conds.get("Ready")
            if ready_cond is None or ready_cond.status != "True":
                why = f"{ready_cond.reason}: {ready_cond.message}" if ready_cond else "no status"
                last[name] = f"not Ready ({why})"
            elif taints:
                last[name] = f"tainted {taints}"
            else:
                last.pop(name, None)
        return not last and set(nodes) >= wanted

    try:
        wait_for(f"nodes {sorted(wanted)} to be Ready", ready, timeout, interval=0.5)
    except Exception as e:
        raise NodeError(f"{e}; {last}") from None


# ---- the pods' processes, as seen from this machine -------------------------------------------


def _memory_hierarchy() -> Path:
    if (CGROUP_FS / "cgroup.controllers").exists():
        return CGROUP_FS
    return CGROUP_FS / "memory"


def container_cgroup(pod, container: str | None = None) -> Path:
    """The cgroup directory (memory hierarchy) of a running container of ``pod`` (the
    kubernetes client's V1Pod): the kubelet's cgroupfs driver names it after the container's
    id, under ``pod<uid>`` in the pod's QoS class."""
    statuses = [s for s in pod.status.container_statuses or [] if container in (None, s.name)]
    if not statuses or not statuses[0].container_id:
        raise NodeError(f"pod {pod.metadata.name} has no running container {container or ''}")
    cid = statuses[0].container_id.split("://", 1)[1]
    top = _memory_hierarchy()
    uid = pod.metadata.uid
    for pattern in (f"*/kubepods/pod{uid}/{cid}", f"*/kubepods/*/pod{uid}/{cid}"):
        found = list(top.glob(pattern))
        if found:
            return found[0]
    raise NodeError(f"no cgroup for container {cid[:12]} of pod {pod.metadata.name}")


def container_main_pid(pod, container: str | None = None) -> int:
    """The host pid of the container's first process (the one whose parent is outside it)."""
    pids = {int(p) for p in (container_cgroup(pod, container) / "cgroup.procs").read_text().split()}
    for pid in sorted(pids):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid not in pids:
            return pid
    raise NodeError(f"no process in the container of pod {pod.metadata.name}")
