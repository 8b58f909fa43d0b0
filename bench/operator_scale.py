"""The operator at scale: how long it takes to bring many CacheClusters to Ready, and what it
costs the operator in memory and CPU (`make bench-operator`; numbers in docs/benchmarks.md).

A real control plane (e2e/cluster.py: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler) with simulated nodes and pods: kwok, built from its Go module by `make
e2e-bins`, owns fake Node objects (labelled with zones and racks as the placement strategies
require) and plays their kubelets: every pod bound to one of them turns Running and Ready at
once, no container behind it. The operator runs as a local process (`cacheoperator
--standalone --report-timeout 0`: there are no servers to ask for their reports) with the
credentials of the chart's ServiceAccount and the chart's RBAC.

Then, against the clock: create --clusters CacheClusters (default spec, each on its own port,
so that they share nodes) at once, and wait until every one says phase Ready with all its
pods ready. The operator's peak RSS is the kernel's high-water mark (VmHWM) and its CPU the
user + system time of its process, both over its whole life (start-up included) until then.
The API server's audit log counts the operator's requests, and the CPU time of every process
says where the machine's time went (the control plane's raised client rate limits keep its
own controllers from being what is measured). Everything started is stopped at the end,
also on failure or Ctrl-C; --keep leaves the logs.

    .venv/bin/python bench/operator_scale.py                  # 300 CacheClusters x 3 pods
    .venv/bin/python bench/operator_scale.py --clusters 30 --replicas 1 --nodes 3
    .venv/bin/python bench/operator_scale.py --floor          # no operator: the floor
    .venv/bin/python bench/operator_scale.py --operator-source DIR   # another version

Machines are shared and their load moves: compare runs made one right after the other.
`--floor` applies the objects the operator would make straight from here (as it does, eight
clusters at a time) and times the pods to Ready: what the control plane needs on its own.
`--operator-source DIR` runs another version of the operator, e.g. `git archive REV
operator/cacheoperator | tar -x -C DIR` and DIR/operator, for before and after.

The last line is the result: `operator-scale: <C> CacheClusters x <R> pods Ready in <S> s;
operator peak RSS <M> MiB; CPU <T> s` (on one line).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e import procs
from e2e.base import REPO_ROOT, ClusterError, binary, cache_dir, versions, wait_for
from e2e.cluster import LocalCluster
from e2e.product import RELEASE, helm_env, run_tool, service_account_kubeconfig
from testkit.net import free_port

CHART = REPO_ROOT / "charts" / "cache-operator"
CRDS = REPO_ROOT / "crds"
NAMESPACE = "default"
OPERATOR_NAMESPACE = "cache-system"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{RELEASE}"
FAKE_NODE = "kwok.x-k8s.io/node"
ZONE_KEY = "topology.kubernetes.io/zone"
RACK_KEY = "topology.cache.appliance.io/rack"
FIRST_PORT = 11211
MIB = 1 << 20

# The control plane's own controllers must not be what is measured: kube-controller-manager
# talks to the API server at 20 requests/s by default (per controller), and its StatefulSet
# controller alone makes ~3 requests per pod; kube-scheduler binds at 50/s.
CONTROL_PLANE_ARGS = {
    "kube-controller-manager": [
        "--kube-api-qps=300",
        "--kube-api-burst=600",
        "--concurrent-statefulset-syncs=20",
    ],
    "kube-scheduler": ["--kube-api-qps=300", "--kube-api-burst=600"],
}
# Seconds until the API server has written what it audited (batch mode).
AUDIT_FLUSH = 1.0
# Only the operator's requests, at the end of each (watches when they end).
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived", "ResponseStarted"],
    "rules": [{"level": "Metadata", "users": [OPERATOR_USER]}, {"level": "None"}],
}


def log(message: str) -> None:
    print(f"[operator-scale] {message}", flush=True)


def kwok_files() -> tuple[Path, Path]:
    """kwok's binary and its stages (`make e2e-bins`), at the pinned version."""
    version = versions()["KWOK_VERSION"]
    bin_dir = cache_dir() / "bin"
    kwok, stages = bin_dir / f"kwok-{version}", bin_dir / f"kwok-stages-{version}.yaml"
    if not os.access(kwok, os.X_OK) or not stages.is_file():
        raise ClusterError(f"{kwok.name} is not built yet: run `make e2e-bins`")
    return kwok, stages


def fake_node(index: int, zones: int, racks: int, address: str) -> dict:
    """A Node that kwok plays the kubelet of (the annotation): node i is in zone-<i mod
    zones>, and in rack z<zone>-r<k> of that zone, k = (i div zones) mod racks; roomy
    enough that CPU, memory and pod count never limit placement."""
    zone = index % zones
    rack = f"z{zone}-r{(index // zones) % racks}"
    room = {"cpu": "128", "memory": "1Ti", "pods": "250"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": f"fake-{index:03d}",
            "annotations": {FAKE_NODE: "fake"},
            "labels": {
                "kubernetes.io/hostname": f"fake-{index:03d}",
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                ZONE_KEY: f"zone-{zone}",
                RACK_KEY: rack,
                "type": "kwok",
            },
        },
        "status": {
            "allocatable": room,
            "capacity": room,
            "addresses": [{"type": "InternalIP", "address": address}],
        },
    }


def cache_cluster(index: int, replicas: int) -> dict:
    """Every default of the spec but the port (so that all share nodes, docs/operator.md)."""
    return {
        "apiVersion": "cache.appliance.io/v1alpha1",
        "kind": "CacheCluster",
        "metadata": {"name": f"bench-{index:04d}", "namespace": NAMESPACE},
        "spec": {"replicas": replicas, "port": FIRST_PORT + index},
    }


class Process:
    """One process of ours (operator, kwok): its own process group, a log, a bounded stop."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict | None = None):
        self.name = name
        self.record, self.popen = procs.start(
            name, argv, log_dir / f"{name}.log", env=env, die_with_parent=True
        )

    @property
    def pid(self) -> int:
        return self.record.pid

    def check_alive(self) -> None:
        if not self.record.alive():
            raise ClusterError(f"{self.name} exited:\n{self.record.tail(30)}")

    def stop(self) -> None:
        self.record.stop(10.0, self.popen)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / MIB
    raise ClusterError(f"no VmHWM for pid {pid}")


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def audit_counts(path: Path) -> collections.Counter:
    """The operator's requests by verb and resource, from the API server's audit log."""
    counts: collections.Counter = collections.Counter()
    if not path.exists():
        return counts
    with path.open() as f:
        for line in f:
            event = json.loads(line)
            ref = event.get("objectRef") or {}
            resource = ref.get("resource", "?")
            if ref.get("subresource"):
                resource += "/" + ref["subresource"]
            counts[(event.get("verb", "?"), resource)] += 1
    return counts


def machine() -> str:
    load = os.getloadavg()
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.audit_log = workdir / "audit.log"
        self.cluster: LocalCluster | None = None
        self.processes: list[Process] = []
        self.api = None

    # ---- set-up -------------------------------------------------------------------------

    def start(self) -> None:
        kwok, stages = kwok_files()
        policy = self.workdir / "audit-policy.json"
        policy.write_text(json.dumps(AUDIT_POLICY))
        extra = {k: list(v) for k, v in CONTROL_PLANE_ARGS.items()}
        extra["kube-apiserver"] = [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--audit-log-maxsize=0",
            # Written in the background, not in the path of each request it records.
            "--audit-log-mode=batch",
            f"--audit-log-batch-max-wait={AUDIT_FLUSH:g}s",
        ]
        self.cluster = LocalCluster(self.workdir / "cluster", extra_args=extra)
        log(f"control plane in {self.workdir}")
        self.cluster.start(timeout=self.args.timeout)
        from kubernetes import client

        self.api = self.cluster.api_client()
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        env = helm_env(self.cluster.kubeconfig, binary("kubectl").parent)
        kubectl = str(binary("kubectl"))
        run_tool([kubectl, "apply", "--server-side", "-f", str(CRDS)], env)
        run_tool(
            [kubectl, "wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRDS)],
            env,
            timeout=90,
        )
        self._operator_rbac(env, kubectl)
        self._start_kwok(kwok, stages)
        if not self.args.floor:
            self._start_operator()

    def _operator_rbac(self, env: dict, kubectl: str) -> None:
        """The chart's ServiceAccount and RBAC, nothing else of it (the operator runs here)."""
        self.core.create_namespace({"metadata": {"name": OPERATOR_NAMESPACE}})
        rendered = run_tool(
            [
                str(binary("helm")),
                "template",
                RELEASE,
                str(CHART),
                "--namespace",
                OPERATOR_NAMESPACE,
                f"--kube-version={versions()['KUBERNETES_VERSION']}",
                "--show-only",
                "templates/serviceaccount.yaml",
                "--show-only",
                "templates/rbac.yaml",
            ],
            env,
        ).stdout
        manifest = self.workdir / "operator-rbac.yaml"
        manifest.write_text(rendered)
        run_tool([kubectl, "apply", "-f", str(manifest)], env)
        self.operator_kubeconfig = service_account_kubeconfig(
            self.api,
            self.cluster.kubeconfig,
            self.workdir / "operator.kubeconfig",
            account=RELEASE,
            namespace=OPERATOR_NAMESPACE,
        )

    def _start_kwok(self, kwok: Path, stages: Path) -> None:
        assert self.cluster is not None and self.cluster.network is not None
        self.processes.append(
            Process(
                "kwok",
                [
                    str(kwok),
                    f"--kubeconfig={self.cluster.kubeconfig}",
                    f"--config={stages}",
                    f"--manage-nodes-with-annotation-selector={FAKE_NODE}=fake",
                    "--node-lease-duration-seconds=40",
                    f"--node-ip={self.cluster.address}",
                    "--cidr=10.254.0.0/16",
                ],
                self.workdir / "logs",
                env={"HOME": str(self.workdir), "PATH": "/usr/bin:/bin"},
            )
        )
        network = self.cluster.network
        nodes = [
            fake_node(i, self.args.zones, self.args.racks, network.node_ip(i + 1))
            for i in range(self.args.nodes)
        ]
        for node in nodes:
            self.core.create_node(node)

        def all_ready() -> bool:
            self.processes[-1].check_alive()
            ready = 0
            for node in self.core.list_node(label_selector="type=kwok").items:
                conditions = {c.type: c.status for c in node.status.conditions or []}
                ready += conditions.get("Ready") == "True"
            return ready == len(nodes)

        wait_for(f"{len(nodes)} kwok nodes to be Ready", all_ready, self.args.timeout)
        log(
            f"{len(nodes)} fake nodes Ready ({self.args.zones} zones, {self.args.racks} racks each)"
        )

    def _start_operator(self) -> None:
        liveness = free_port()
        self.metrics_port = free_port()
        env = {
            "KUBECONFIG": str(self.operator_kubeconfig),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.workdir),
        }
        if self.args.operator_source:
            env["PYTHONPATH"] = str(self.args.operator_source.resolve())
        self.operator = Process(
            "operator",
            [
                sys.executable,
                "-m",
                "cacheoperator.main",
                "--standalone",
                "--report-timeout=0",
                f"--liveness=http://127.0.0.1:{liveness}/healthz",
                f"--metrics-port={self.metrics_port}",
                "--metrics-address=127.0.0.1",
            ],
            self.workdir / "logs",
            env=env,
        )
        self.processes.append(self.operator)

        def live() -> bool:
            self.operator.check_alive()
            with urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=2) as r:
                return r.status == 200

        wait_for("the operator's liveness endpoint", live, self.args.timeout)
        rss = peak_rss_mib(self.operator.pid)
        log(f"operator up (pid {self.operator.pid}, peak RSS {rss:.0f} MiB so far)")

    # ---- the measurement ----------------------------------------------------------------

    def run_floor(self) -> float:
        """No operator: the objects it would make for each CacheCluster (its own builders,
        no owner, no placement gate), applied as it applies them, 8 clusters at a time;
        seconds until every pod is Ready. What the control plane takes on its own, on this
        machine, now."""
        from cacheoperator.children import desired_objects
        from cacheoperator.gate import GATE
        from cacheoperator.kube import Kube
        from cacheoperator.models import parse_spec
        from cacheoperator.naming import DEFAULT_IMAGE, LABEL_MANAGED_BY, MANAGED_BY, ClusterRef

        args = self.args
        kube = Kube(self.api)

        def apply(index: int) -> None:
            body = cache_cluster(index, args.replicas)
            name = body["metadata"]["name"]
            ref = ClusterRef(name, NAMESPACE, f"floor-{index}")
            for obj in desired_objects(ref, parse_spec(name, body["spec"]), DEFAULT_IMAGE):
                del obj["metadata"]["ownerReferences"]  # no owner: the collector keeps them
                if obj["kind"] == "StatefulSet":
                    # Nothing here would lift warm restart's placement gate (the operator's
                    # release is its own work, measured in the real runs): pods go ungated.
                    pod_spec = obj["spec"]["template"]["spec"]
                    gates = [g for g in pod_spec.get("schedulingGates") or [] if g["name"] != GATE]
                    pod_spec["schedulingGates"] = gates
                kube.apply(obj)

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(apply, range(args.clusters)))
        log(f"objects of {args.clusters} clusters applied in {time.monotonic() - started:.1f} s")
        want = args.clusters * args.replicas

        def all_ready() -> bool:
            pods = self.core.list_namespaced_pod(
                NAMESPACE, label_selector=f"{LABEL_MANAGED_BY}={MANAGED_BY}"
            ).items
            ready = sum(
                1
                for pod in pods
                if any(
                    c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
                )
            )
            return ready == want

        wait_for(f"{want} pods to be Ready", all_ready, args.ready_timeout, interval=1.0)
        return time.monotonic() - started

    def run(self) -> tuple[float, float, float]:
        args = self.args
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda i: self.custom.create_namespaced_custom_object(
                        "cache.appliance.io",
                        "v1alpha1",
                        NAMESPACE,
                        "cacheclusters",
                        cache_cluster(i, args.replicas),
                    ),
                    range(args.clusters),
                )
            )
        log(f"{args.clusters} CacheClusters created in {time.monotonic() - started:.1f} s")
        deadline = started + args.ready_timeout
        last_report = 0.0
        while True:
            self.operator.check_alive()
            items = self.custom.list_namespaced_custom_object(
                "cache.appliance.io", "v1alpha1", NAMESPACE, "cacheclusters"
            )["items"]
            ready = sum(
                1
                for cc in items
                if (cc.get("status") or {}).get("phase") == "Ready"
                and (cc.get("status") or {}).get("readyReplicas") == args.replicas
            )
            now = time.monotonic()
            if ready == args.clusters:
                elapsed = now - started
                break
            if now - last_report >= 5:
                log(
                    f"{now - started:5.1f} s: {ready}/{args.clusters} Ready; operator RSS "
                    f"peak {peak_rss_mib(self.operator.pid):.0f} MiB, CPU "
                    f"{cpu_seconds(self.operator.pid):.1f} s"
                )
                last_report = now
            if now > deadline:
                raise ClusterError(
                    f"only {ready}/{args.clusters} CacheClusters Ready after "
                    f"{args.ready_timeout:.0f} s; operator log:\n{self.operator.record.tail(30)}"
                )
            time.sleep(1.0)
        rss, cpu = peak_rss_mib(self.operator.pid), cpu_seconds(self.operator.pid)
        passes = self._reconcile_passes()
        log(f"all Ready after {elapsed:.1f} s; {passes} reconcile passes")
        if args.settle:
            # A quiet cluster must cost nothing: what the operator does once all is Ready.
            time.sleep(AUDIT_FLUSH * 2)
            before, cpu_before = self._requests_total(), cpu_seconds(self.operator.pid)
            time.sleep(args.settle)
            log(
                f"the {args.settle:.0f} s after: {self._requests_total() - before} requests, "
                f"CPU {cpu_seconds(self.operator.pid) - cpu_before:.1f} s"
            )
        return elapsed, rss, cpu

    def _reconcile_passes(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
        except OSError as exc:
            return f"? ({exc})"
        total = 0.0
        for line in text.splitlines():
            if line.startswith("cacheoperator_reconciles_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return f"{total:.0f}"

    def _requests_total(self) -> int:
        return sum(audit_counts(self.audit_log).values())

    def report_cpu(self) -> None:
        """CPU seconds of every process of the bench so far: where the machine's time went."""
        assert self.cluster is not None
        parts = []
        for rec in [*self.cluster.records, *(p.record for p in self.processes)]:
            try:
                parts.append(f"{rec.name} {cpu_seconds(rec.pid):.0f}")
            except (OSError, ValueError):
                parts.append(f"{rec.name} ?")
        log(f"CPU seconds by process: {', '.join(parts)}")

    def report_requests(self) -> None:
        time.sleep(AUDIT_FLUSH * 2)
        counts = audit_counts(self.audit_log)
        if not counts:
            return
        total = sum(counts.values())
        top = ", ".join(f"{verb} {res} {n}" for (verb, res), n in counts.most_common(8))
        log(f"operator API requests: {total} ({top})")

    # ---- tear-down ----------------------------------------------------------------------

    def stop(self) -> None:
        errors = []
        for process in reversed(self.processes):
            try:
                process.stop()
            except RuntimeError as exc:
                errors.append(str(exc))
        self.processes = []
        if self.api is not None:
            self.api.close()
        if self.cluster is not None:
            try:
                self.cluster.stop()
            except ClusterError as exc:
                errors.append(str(exc))
        if errors:
            raise ClusterError("; ".join(errors))


def interrupted(signum: int, frame: object) -> None:
    """SIGTERM stops everything as Ctrl-C does."""
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", type=int, default=300, help="CacheClusters (300)")
    parser.add_argument("--replicas", type=int, default=3, help="pods per CacheCluster (3)")
    parser.add_argument("--nodes", type=int, default=30, help="fake nodes (30)")
    parser.add_argument("--zones", type=int, default=3, help="zones of the nodes (3)")
    parser.add_argument("--racks", type=int, default=2, help="racks per zone (2)")
    parser.add_argument(
        "--ready-timeout", type=float, default=300, help="seconds to wait for Ready (300)"
    )
    parser.add_argument(
        "--settle", type=float, default=10, help="seconds to watch the operator after (10)"
    )
    parser.add_argument("--timeout", type=float, default=120, help="seconds for each set-up step")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs)")
    parser.add_argument(
        "--operator-source",
        type=Path,
        metavar="DIR",
        help="run the cacheoperator package in DIR instead of this checkout's (e.g. another "
        "commit's operator/ directory from `git archive`): before and after on one machine",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="no operator: apply its objects for each cluster directly and time the pods "
        "to Ready, the control plane's own share",
    )
    args = parser.parse_args(argv)
    if args.nodes > 240:
        parser.error("--nodes: at most 240 (one address each on the cluster's /24)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="operator-scale-"))
    bench = Bench(args, workdir)
    signal.signal(signal.SIGTERM, interrupted)
    log(machine())
    result = floor = None
    try:
        bench.start()
        if args.floor:
            floor = bench.run_floor()
        else:
            result = bench.run()
        bench.report_cpu()
        bench.report_requests()
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
    finally:
        try:
            bench.stop()
        finally:
            if args.keep:
                log(f"logs kept in {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    log(machine())
    if floor is not None:
        print(
            f"control-plane floor: {args.clusters} clusters x {args.replicas} pods (the "
            f"operator's objects, applied directly) Ready in {floor:.1f} s"
        )
        return 0
    if result is None:
        return 1
    elapsed, rss, cpu = result
    print(
        f"operator-scale: {args.clusters} CacheClusters x {args.replicas} pods Ready in "
        f"{elapsed:.1f} s; operator peak RSS {rss:.0f} MiB; CPU {cpu:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
