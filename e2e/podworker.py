"""The life of one pod on a node of the e2e node agent: resolve its containers' env and
command lines, run them in memory/cpuset cgroups, restart and probe them, report status to
the API server, and on deletion stop them within the grace period and remove the pod object
as the kubelet does. Test infrastructure, not product code."""

from __future__ import annotations

import copy
import logging
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e import podenv
from e2e.cgroups import CgroupError, Cgroups, join_argv
from e2e.container import Container, LaunchPlan, default_path, now_rfc3339

TICK = 0.2  # seconds between looks at processes and probes
DEFAULT_GRACE = 30


class CpuPool:
    """The kubelet's static CPU manager in miniature: Guaranteed containers with an integer
    CPU limit get CPUs of their own; everything else shares the rest. Nodes of the agent are
    simulated, so each node's pool is the CPUs the agent may use; exclusivity holds per node."""

    def __init__(self, cpus: list[int]) -> None:
        self.cpus = sorted(cpus)
        self._taken: dict[str, set[int]] = {}
        self._lock = threading.Lock()

    def shared(self) -> set[int]:
        with self._lock:
            return set(self.cpus) - set().union(*self._taken.values())

    def allocate(self, key: str, count: int) -> set[int] | None:
        """``count`` CPUs for ``key``, None when that would leave no shared CPU."""
        with self._lock:
            free = [c for c in self.cpus if c not in set().union(*self._taken.values())]
            if count < 1 or count >= len(free):
                return None
            chosen = set(free[-count:])  # from the top: low CPUs stay shared, as on a real node
            self._taken[key] = chosen
            return chosen

    def release(self, key: str) -> None:
        with self._lock:
            self._taken.pop(key, None)


@dataclass
class NodeContext:
    """What a pod worker needs from the node it runs on."""

    name: str
    address: str
    allocatable: dict[str, str]
    core: Any  # kubernetes.client.CoreV1Api with the node's own credentials
    cgroups: Cgroups | None
    cpus: CpuPool
    work_dir: Path
    entrypoints: dict[str, list[str]] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("nodeagent"))

    def event(self, pod: Mapping, reason: str, message: str, kind: str = "Normal") -> None:
        """Record an Event on the pod, as the kubelet does; failures are only logged."""
        meta = pod["metadata"]
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "reason": reason,
            "message": message[:1000],
            "type": kind,
            "source": {"component": "kubelet", "host": self.name},
            "firstTimestamp": now_rfc3339(),
            "lastTimestamp": now_rfc3339(),
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], body)
        except Exception as e:
            self.log.debug("event %s on %s not recorded: %s", reason, meta["name"], e)


def is_guaranteed(pod: Mapping) -> bool:
    for c in pod["spec"]["containers"]:
        res = c.get("resources") or {}
        limits, requests = res.get("limits") or {}, res.get("requests") or {}
        for r in ("cpu", "memory"):
            if r not in limits or podenv.cpu_count(requests.get(r, limits[r])) != (
                podenv.cpu_count(limits[r])
            ):
                return False
    return True


class PodWorker(threading.Thread):
    def __init__(self, node: NodeContext, pod: Mapping, on_exit) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.node = node
        self.uid: str = meta["uid"]
        self.key = f"{meta['namespace']}/{meta['name']}"
        self._pod = copy.deepcopy(dict(pod))
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._gone = False
        self._shutdown: float | None = None  # agent stopping: kill with this grace
        self._on_exit = on_exit
        spec = pod["spec"]
        policy = spec.get("restartPolicy") or "Always"
        self.containers = [Container(c, node.address, policy) for c in spec["containers"]]
        previous = {
            s["name"]: s.get("restartCount", 0)
            for s in (pod.get("status") or {}).get("containerStatuses") or []
        }
        for c in self.containers:  # an agent restart continues the count
            c.restart_count = previous.get(c.name, 0)
        self.pod_dir = node.work_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{self.uid}"
        self.start_time = (pod.get("status") or {}).get("startTime") or now_rfc3339()
        self._conditions: dict[str, dict] = {}
        self._last_status: dict | None = None

    # ---- input from the node's watch -----------------------------------------------------

    def update(self, pod: Mapping) -> None:
        with self._lock:
            self._pod = copy.deepcopy(dict(pod))
        self._wake.set()

    def gone(self) -> None:
        """The pod object was removed (force-deleted): stop without waiting for a grace."""
        self._gone = True
        self._wake.set()

    def shutdown(self, grace: float) -> None:
        """The agent is stopping (the node goes away): kill, leave the pod object alone."""
        self._shutdown = grace
        self._wake.set()

    def pod(self) -> dict:
        with self._lock:
            return self._pod

    # ---- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            self.node.log.exception("pod worker %s crashed", self.key)
            self._stop_containers(2.0)
        finally:
            self._cleanup()
            self._on_exit(self.uid)

    def _run(self) -> None:
        self.pod_dir.mkdir(parents=True, exist_ok=True)
        while True:
            pod = self.pod()
            if self._shutdown is not None:
                self._stop_containers(self._shutdown)
                return
            if self._gone:
                self._stop_containers(2.0)
                return
            if pod["metadata"].get("deletionTimestamp"):
                self._terminate(pod)
                return
            now = time.monotonic()
            for c in self.containers:
                if c.poll():
                    self._on_exit_event(pod, c)
                if c.wants_start(now):
                    self._start(pod, c)
                if c.probe(now, lambda kind, msg, c=c, pod=pod: self._unhealthy(pod, c, kind, msg)):
                    self.node.event(
                        pod, "Killing", f"Container {c.name} failed its probe, will be restarted"
                    )
                    c.kill_for_restart(self._grace(pod))
                    self._on_exit_event(pod, c)
            self._report(pod)
            self._wake.wait(TICK)
            self._wake.clear()

    def _grace(self, pod: Mapping) -> float:
        meta, spec = pod["metadata"], pod["spec"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE)
        return float(grace)

    def _unhealthy(self, pod: Mapping, c: Container, kind: str, message: str) -> None:
        self.node.event(
            pod, "Unhealthy", f"{kind.capitalize()} probe failed: {message}", kind="Warning"
        )

    def _on_exit_event(self, pod: Mapping, c: Container) -> None:
        t = c.terminated or {}
        self.node.log.info("%s: container %s exited with %s", self.key, c.name, t.get("exitCode"))
        if not c.finished:
            self.node.event(
                pod, "BackOff", f"Back-off restarting failed container {c.name}", "Warning"
            )

    # ---- starting a container ------------------------------------------------------------

    def _start(self, pod: Mapping, c: Container) -> None:
        try:
            plan = self._plan(pod, c)
        except podenv.ContainerConfigError as e:
            c.waiting = ("CreateContainerConfigError", str(e))
            c.next_start = time.monotonic() + 2.0  # the kubelet keeps retrying
            return
        except CgroupError as e:
            c.waiting = ("RunContainerError", str(e))
            c.next_start = time.monotonic() + 5.0
            return
        try:
            c.start(plan)
        except OSError as e:
            c.waiting = ("RunContainerError", str(e))
            c.next_start = time.monotonic() + 5.0
            self.node.event(pod, "Failed", f"Error: {e}", "Warning")
            return
        self.node.event(
            pod, "Started", f"Started container {c.name}: {' '.join(plan.command)[:200]}"
        )

    def _lookup(self, kind: str):
        def lookup(namespace: str, name: str) -> Mapping[str, str] | None:
            read = (
                self.node.core.read_namespaced_config_map
                if kind == "configmap"
                else self.node.core.read_namespaced_secret
            )
            try:
                obj = read(name, namespace)
            except Exception as e:
                if getattr(e, "status", None) == 404:
                    return None
                raise podenv.ContainerConfigError(f"cannot read {kind} {name}: {e}") from e
            # The client decodes Secret data to base64 strings; ConfigMap data is plain.
            return dict(obj.data or {})

        return lookup

    def _plan(self, pod: Mapping, c: Container) -> LaunchPlan:
        env = podenv.container_env(
            pod,
            c.spec,
            self.node.address,
            self.node.allocatable,
            self._lookup("configmap"),
            self._lookup("secret"),
        )
        command = podenv.command_line(c.spec, env, self.node.entrypoints)
        full_env = {
            "PATH": default_path(),
            "HOME": str(self.pod_dir),
            # hostNetwork: the container sees the node's hostname.
            "HOSTNAME": self.node.name,
            **env,
        }
        procs_files: list[Path] = []
        if self.node.cgroups is not None:
            limits = (c.spec.get("resources") or {}).get("limits") or {}
            memory = podenv.quantity_bytes(limits.get("memory"))
            cpus = self._cpus(pod, c, limits.get("cpu"))
            procs_files = self.node.cgroups.create(self.uid, c.name, memory, cpus)
        argv = join_argv(procs_files, command) if procs_files else command
        if shutil.which("setpriv"):
            # Killed by the kernel if the agent dies: a node that goes takes its pods along.
            argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
        return LaunchPlan(
            argv=argv,
            command=command,
            env=full_env,
            cwd=self.pod_dir,
            log_dir=self.pod_dir,
            probe_env=full_env,
        )

    def _cpus(self, pod: Mapping, c: Container, cpu_limit: str | None) -> set[int]:
        key = f"{self.uid}/{c.name}"
        self.node.cpus.release(key)
        count = podenv.cpu_count(cpu_limit)
        if is_guaranteed(pod) and count is not None and count == count.to_integral_value():
            exclusive = self.node.cpus.allocate(key, int(count))
            if exclusive is not None:
                return exclusive
            self.node.log.warning(
                "%s: %s CPUs wanted for %s but the machine cannot give them exclusively",
                self.key,
                count,
                c.name,
            )
        return self.node.cpus.shared()

    # ---- stopping ------------------------------------------------------------------------

    def _stop_containers(self, grace: float) -> None:
        for c in self.containers:
            c.stop(grace)

    def _terminate(self, pod: Mapping) -> None:
        grace = self._grace(pod)
        self.node.log.info("%s: deleted, stopping its containers (grace %gs)", self.key, grace)
        deadline = time.monotonic() + grace
        for c in self.containers:
            if c.running:
                self.node.event(pod, "Killing", f"Stopping container {c.name}")
            c.stop(max(0.0, deadline - time.monotonic()))
        self._report(pod)
        meta = pod["metadata"]
        # As the kubelet's status manager does once everything is stopped: remove the object,
        # with the uid as precondition so a new pod of the same name is never hit.
        try:
            self.node.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                grace_period_seconds=0,
                # The body's options win over the query's: say 0 in both.
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}},
            )
        except Exception as e:
            if getattr(e, "status", None) != 404:
                self.node.log.warning("%s: could not remove the pod object: %s", self.key, e)

    def _cleanup(self) -> None:
        for c in self.containers:
            self.node.cpus.release(f"{self.uid}/{c.name}")
        if self.node.cgroups is not None:
            self.node.cgroups.remove(self.uid)

    # ---- status --------------------------------------------------------------------------

    def _condition(self, kind: str, ok: bool, reason: str = "") -> dict:
        status = "True" if ok else "False"
        previous = self._conditions.get(kind)
        if previous is None or previous["status"] != status:
            previous = {"type": kind, "status": status, "lastTransitionTime": now_rfc3339()}
            if reason and not ok:
                previous["reason"] = reason
            self._conditions[kind] = previous
        return previous

    def _phase(self) -> str:
        if all(c.finished for c in self.containers):
            failed = any(c.terminated and c.terminated["exitCode"] != 0 for c in self.containers)
            return "Failed" if failed else "Succeeded"
        if any(c.running or c.restart_count or c.terminated for c in self.containers):
            return "Running"
        return "Pending"

    def _report(self, pod: Mapping) -> None:
        images = {c["name"]: c.get("image", "") for c in pod["spec"]["containers"]}
        statuses = [c.status(images[c.name]) for c in self.containers]
        containers_ready = all(s["ready"] for s in statuses)
        gates = [g["conditionType"] for g in pod["spec"].get("readinessGates") or []]
        existing = {
            c["type"]: c["status"] for c in (pod.get("status") or {}).get("conditions") or []
        }
        gates_ok = all(existing.get(g) == "True" for g in gates)
        address = self.node.address
        status = {
            "phase": self._phase(),
            "hostIP": address,
            "hostIPs": [{"ip": address}],
            "podIP": address,
            "podIPs": [{"ip": address}],
            "startTime": self.start_time,
            "conditions": [
                self._condition("PodReadyToStartContainers", True),
                self._condition("Initialized", True),
                self._condition("ContainersReady", containers_ready, "ContainersNotReady"),
                self._condition("Ready", containers_ready and gates_ok, "ContainersNotReady"),
            ],
            "containerStatuses": statuses,
        }
        if status == self._last_status:
            return
        meta = pod["metadata"]
        try:
            self.node.core.patch_namespaced_pod_status(
                meta["name"],
                meta["namespace"],
                {"status": status},
                _content_type="application/strategic-merge-patch+json",
            )
            self._last_status = status
        except Exception as e:
            # Retried on the next tick; a 404 means the pod is gone and the watch will say so.
            self.node.log.debug("%s: status update failed: %s", self.key, e)
