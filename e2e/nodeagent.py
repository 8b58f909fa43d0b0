"""A node agent that plays the kubelet for the e2e suite. TEST INFRASTRUCTURE ONLY: it runs
no containers and isolates nothing beyond memory/cpuset cgroups; never use it as a node.

It registers nodes (zone and rack labels, capacity, a loopback InternalIP each), keeps their
Leases and Ready condition fresh, and runs every pod bound to them as local processes:
hostNetwork semantics (podIP = hostIP = the node's address), downward-API env, ``$(VAR)``
expansion, a memory cgroup with the container's limit, exclusive CPUs for Guaranteed
integer-CPU containers, restarts per restartPolicy with back-off, readiness and liveness from
the pod's own probes, and deletion within the grace period. Each node talks to the API
server with its own ``system:node:<name>`` credentials, so the Node authorizer and the
NodeRestriction admission plugin check it as they check a kubelet.

    python -m e2e.nodeagent --config nodeagent.json   # what `make up` runs in the background
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from e2e import procs
from e2e.cgroups import CgroupError, Cgroups, pids_under, rmtree
from e2e.container import now_rfc3339
from e2e.podworker import CpuPool, NodeContext, PodWorker

ZONE_LABEL = "topology.kubernetes.io/zone"
RACK_LABEL = "topology.cache.appliance.io/rack"
HOSTNAME_LABEL = "kubernetes.io/hostname"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION = 40
LEASE_RENEW_EVERY = 10.0
STATUS_REPORT_EVERY = 60.0
WATCH_TIMEOUT = 30  # seconds the API server keeps one watch open

log = logging.getLogger("nodeagent")


@dataclass
class NodeSpec:
    name: str
    address: str  # loopback, 127.0.x.y: the node's InternalIP and its pods' IP
    zone: str
    rack: str
    cpu: str = "4"
    memory: str = "8Gi"
    pods: str = "110"
    labels: dict[str, str] = field(default_factory=dict)

    def all_labels(self) -> dict[str, str]:
        return {
            HOSTNAME_LABEL: self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            ZONE_LABEL: self.zone,
            RACK_LABEL: self.rack,
            **self.labels,
        }

    def capacity(self) -> dict[str, str]:
        return {
            "cpu": self.cpu,
            "memory": self.memory,
            "pods": self.pods,
            "ephemeral-storage": "100Gi",
        }


def default_nodes(
    count: int, zones: int, racks_per_zone: int = 2, subnet: int | None = None
) -> list[NodeSpec]:
    """``count`` nodes dealt round-robin over ``zones`` zones (zone-a, zone-b, ...) and, within
    a zone, over ``racks_per_zone`` racks (rack-a1, rack-a2, ...). Addresses are 127.0.<subnet>.N
    with a random subnet unless given, so two clusters on one machine do not collide."""
    if not 1 <= count <= 250 or not 1 <= zones <= 26:
        raise ValueError("1-250 nodes in 1-26 zones")
    subnet = random.randint(2, 254) if subnet is None else subnet
    nodes = []
    for i in range(count):
        zone = chr(ord("a") + i % zones)
        rack = (i // zones) % racks_per_zone + 1
        nodes.append(
            NodeSpec(
                f"node-{i + 1}", f"127.0.{subnet}.{i + 1}", f"zone-{zone}", f"rack-{zone}{rack}"
            )
        )
    return nodes


@dataclass
class AgentConfig:
    cluster_id: str
    work_dir: str
    nodes: list[NodeSpec]
    kubeconfigs: dict[str, str]  # node name -> kubeconfig with that node's credentials
    entrypoints: dict[str, list[str]] = field(default_factory=dict)  # image -> command
    kubelet_version: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> AgentConfig:
        raw = json.loads(text)
        raw["nodes"] = [NodeSpec(**n) for n in raw["nodes"]]
        return cls(**raw)


def _raw(response) -> dict:
    """JSON of a ``_preload_content=False`` response: plain dicts with the API's own keys."""
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()


class NodeRuntime:
    """One simulated node: registration, heartbeats, the pod watch and the pod workers."""

    def __init__(self, spec: NodeSpec, config: AgentConfig, cgroups: Cgroups | None) -> None:
        from kubernetes import client
        from kubernetes import config as kube_config

        self.spec = spec
        self.config = config
        api = kube_config.new_client_from_config(config_file=config.kubeconfigs[spec.name])
        self.api = api
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.ctx = NodeContext(
            name=spec.name,
            address=spec.address,
            allocatable=spec.capacity(),
            core=self.core,
            cgroups=cgroups,
            cpus=CpuPool(sorted(os.sched_getaffinity(0))),
            work_dir=Path(config.work_dir) / spec.name,
            entrypoints=config.entrypoints,
            log=log.getChild(spec.name),
        )
        self.workers: dict[str, PodWorker] = {}
        self._workers_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch_response = None
        self.node_uid = ""

    # ---- registration and heartbeats ----------------------------------------------------

    def _status(self) -> dict:
        now = now_rfc3339()

        def cond(kind: str, status: str, reason: str, message: str) -> dict:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": self._started,
            }

        return {
            "capacity": self.spec.capacity(),
            "allocatable": self.spec.capacity(),
            "addresses": [
                {"type": "InternalIP", "address": self.spec.address},
                {"type": "Hostname", "address": self.spec.name},
            ],
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
                cond("Ready", "True", "KubeletReady", "e2e node agent is posting ready status"),
            ],
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": os.uname().release,
                "osImage": "e2e node agent",
                "containerRuntimeVersion": "nodeagent://0",
                "kubeletVersion": self.config.kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def register(self) -> None:
        from kubernetes.client.exceptions import ApiException

        self._started = now_rfc3339()
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.spec.name, "labels": self.spec.all_labels()},
            "status": self._status(),
        }
        try:
            node = _raw(self.core.create_node(body, _preload_content=False))
        except ApiException as e:
            if e.status != 409:
                raise
            node = _raw(
                self.core.patch_node(
                    self.spec.name,
                    {"metadata": {"labels": self.spec.all_labels()}},
                    _preload_content=False,
                )
            )
        self.node_uid = node["metadata"]["uid"]
        self._report_status()
        self._renew_lease()

    def _report_status(self) -> None:
        self.core.patch_node_status(
            self.spec.name,
            {"status": self._status()},
            _content_type="application/strategic-merge-patch+json",
        )

    def _renew_lease(self) -> None:
        from kubernetes.client.exceptions import ApiException

        patch = {"spec": {"renewTime": now_rfc3339().replace("Z", ".000000Z")}}
        try:
            self.coordination.patch_namespaced_lease(
                self.spec.name,
                LEASE_NAMESPACE,
                patch,
                _content_type="application/merge-patch+json",
            )
            return
        except ApiException as e:
            if e.status != 404:
                raise
        owner = {"apiVersion": "v1", "kind": "Node", "name": self.spec.name, "uid": self.node_uid}
        # Created without renewTime, then renewed: the client would re-encode a MicroTime
        # in a body it parses without the microseconds the API server insists on.
        self.coordination.create_namespaced_lease(
            LEASE_NAMESPACE,
            {
                "metadata": {"name": self.spec.name, "ownerReferences": [owner]},
                "spec": {"holderIdentity": self.spec.name, "leaseDurationSeconds": LEASE_DURATION},
            },
        )
        self.coordination.patch_namespaced_lease(
            self.spec.name, LEASE_NAMESPACE, patch, _content_type="application/merge-patch+json"
        )

    def _heartbeat_loop(self) -> None:
        last_status = time.monotonic()
        while not self._stop.wait(LEASE_RENEW_EVERY):
            try:
                self._renew_lease()
                if time.monotonic() - last_status >= STATUS_REPORT_EVERY:
                    self._report_status()
                    last_status = time.monotonic()
            except Exception as e:
                log.warning("%s: heartbeat failed: %s", self.spec.name, e)

    # ---- pods ---------------------------------------------------------------------------

    def _dispatch(self, kind: str, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        with self._workers_lock:
            worker = self.workers.get(uid)
            if kind == "DELETED":
                if worker:
                    worker.gone()
                return
            if worker is None:
                if self._stop.is_set() or self._is_done(pod):
                    return
                worker = PodWorker(self.ctx, pod, self._forget)
                self.workers[uid] = worker
                worker.start()
                return
        worker.update(pod)

    @staticmethod
    def _is_done(pod: dict) -> bool:
        # A pod that already finished, or one going away that nothing runs for: only the
        # object is left to remove.
        phase = (pod.get("status") or {}).get("phase")
        return phase in ("Succeeded", "Failed") and not pod["metadata"].get("deletionTimestamp")

    def _forget(self, uid: str) -> None:
        with self._workers_lock:
            self.workers.pop(uid, None)

    def _list(self) -> str:
        listing = _raw(
            self.core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={self.spec.name}",
                _preload_content=False,
                _request_timeout=30,
            )
        )
        seen = set()
        for pod in listing.get("items") or []:
            seen.add(pod["metadata"]["uid"])
            self._dispatch("ADDED", pod)
        with self._workers_lock:
            missing = [w for uid, w in self.workers.items() if uid not in seen]
        for worker in missing:
            worker.gone()
        return listing["metadata"]["resourceVersion"]

    def _watch_loop(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        version = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._list()
                response = self.core.list_pod_for_all_namespaces(
                    field_selector=f"spec.nodeName={self.spec.name}",
                    watch=True,
                    resource_version=version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=WATCH_TIMEOUT,
                    _preload_content=False,
                    _request_timeout=(10, WATCH_TIMEOUT + 15),
                )
                self._watch_response = response
                try:
                    for line in iter_resp_lines(response):
                        if self._stop.is_set():
                            break
                        if not line:
                            continue
                        event = json.loads(line)
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            # 410 Gone: our version is too old; list again.
                            version = None
                            break
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            self._dispatch(event["type"], obj)
                finally:
                    self._watch_response = None
                    with contextlib.suppress(Exception):
                        response.close()
                        response.release_conn()
            except Exception as e:
                if self._stop.is_set():
                    break
                log.warning("%s: pod watch failed, listing again: %s", self.spec.name, e)
                version = None
                self._stop.wait(1.0)

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self.ctx.work_dir.mkdir(parents=True, exist_ok=True)
        self.register()
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._watch_loop, "watch")):
            t = threading.Thread(target=target, name=f"{self.spec.name}-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, grace: float = 5.0) -> None:
        """The node goes away: kill its pods' processes (the pod objects stay, as when a real
        node dies) and stop talking to the API server."""
        self._stop.set()
        response = self._watch_response
        if response is not None:
            with contextlib.suppress(Exception):
                # Unblocks the watch thread's read (urllib3 >= 2.3); it also checks _stop
                # after every event and every WATCH_TIMEOUT at the latest.
                response.shutdown()
        with self._workers_lock:
            workers = list(self.workers.values())
        for w in workers:
            w.shutdown(grace)
        for w in workers:
            w.join(grace + 10)
        for t in self._threads:
            t.join(5)
        self.api.close()


class NodeAgent:
    """All the nodes of one cluster, in this process."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.cgroups: Cgroups | None = None
        self.cgroups_error = ""
        try:
            self.cgroups = Cgroups(f"cache-appliance-{config.cluster_id}")
        except (CgroupError, OSError) as e:
            self.cgroups_error = str(e)
            log.warning("running pods without cgroups: %s", e)
        self.nodes = [NodeRuntime(spec, config, self.cgroups) for spec in config.nodes]

    def start(self) -> NodeAgent:
        work = Path(self.config.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        roots = []
        if self.cgroups:
            roots = [str(self.cgroups.memory_root)]
            if self.cgroups.cpuset_root and self.cgroups.cpuset_root != self.cgroups.memory_root:
                roots.append(str(self.cgroups.cpuset_root))
        (work / "cgroups.json").write_text(json.dumps({"roots": roots}))
        started = []
        try:
            for node in self.nodes:
                node.start()
                started.append(node)
        except BaseException:
            for node in started:
                node.stop()
            raise
        return self

    def stop(self, grace: float = 5.0) -> None:
        for node in self.nodes:
            node.stop(grace)
        if self.cgroups:
            self.cgroups.remove()

    def container_log(self, namespace: str, pod: str, container: str) -> str:
        """The newest log of a container (what `kubectl logs` would show)."""
        for node in self.nodes:
            for d in (node.ctx.work_dir / "pods").glob(f"{namespace}_{pod}_*/{container}"):
                logs = sorted(d.glob("*.log"), key=lambda p: int(p.stem))
                if logs:
                    return logs[-1].read_text(errors="replace")
        return ""


def wait_nodes_ready(api_client, names: Iterable[str], timeout: float) -> None:
    """Until every node is Ready and untainted (the node lifecycle controller removes its
    not-ready taint), so the scheduler will place pods on it."""
    from kubernetes import client

    from e2e.cluster import wait_for

    core = client.CoreV1Api(api_client)
    wanted = set(names)

    def ready() -> bool:
        nodes = {n.metadata.name: n for n in core.list_node().items}
        for name in wanted:
            node = nodes.get(name)
            if node is None:
                return False
            conds = {c.type: c.status for c in node.status.conditions or []}
            if conds.get("Ready") != "True" or node.spec.taints:
                return False
        return True

    wait_for(f"nodes {sorted(wanted)} to be Ready and untainted", ready, timeout, interval=0.5)


# ---- running in the background (make up / make down) ------------------------------------


def start_detached(config: AgentConfig, record_path: Path) -> procs.ProcessRecord:
    from e2e.cluster import REPO_ROOT

    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "config.json"
    config_path.write_text(config.to_json())
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    rec, _ = procs.start(
        "nodeagent",
        [sys.executable, "-m", "e2e.nodeagent", "--config", str(config_path)],
        work / "nodeagent.log",
        env=env,
        cwd=REPO_ROOT,
    )
    record_path.write_text(json.dumps({**rec.to_dict(), "work_dir": config.work_dir}))
    return rec


def detached_record(record_path: Path) -> procs.ProcessRecord | None:
    if not record_path.exists():
        return None
    return procs.ProcessRecord.from_dict(json.loads(record_path.read_text()))


def stop_detached(record_path: Path) -> None:
    """Stop a background agent (it kills its pods on SIGTERM), then remove any cgroups and
    processes a crashed agent may have left behind."""
    if not record_path.exists():
        return
    raw = json.loads(record_path.read_text())
    procs.ProcessRecord.from_dict(raw).stop(grace=30.0)
    cgroups_file = Path(raw["work_dir"]) / "cgroups.json"
    if cgroups_file.exists():
        for root in json.loads(cgroups_file.read_text())["roots"]:
            sweep_cgroup(Path(root))
    record_path.unlink()


def sweep_cgroup(root: Path, timeout: float = 5.0) -> None:
    """Kill whatever still runs in a cgroup tree, then remove the tree."""
    deadline = time.monotonic() + timeout
    while (pids := pids_under(root)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    rmtree(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.nodeagent", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = AgentConfig.from_json(args.config.read_text())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent = NodeAgent(config).start()
    log.info("nodes %s registered; running their pods", [n.name for n in config.nodes])
    while not stop.wait(1.0):
        pass
    log.info("stopping: killing the pods' processes")
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
