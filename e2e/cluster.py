"""A real Kubernetes control plane on loopback for the e2e suite, run as plain processes.

etcd, kube-apiserver (TLS, Node+RBAC authorization, admission on), kube-controller-manager
(service-account tokens, statefulsets, garbage collection, node lifecycle, ...) and
kube-scheduler, built from their Go modules by e2e/build-control-plane.sh. Everything lives
in one working directory: certificates, etcd data, a log per process, an admin kubeconfig
and ``state.json`` (pids), so another program can stop what this one started.

As a library: ``LocalCluster(workdir).start()`` / ``.stop()``. As a command:

    python -m e2e.cluster up [--state-dir DIR] [--nodes 3] [--zones 2]
    python -m e2e.cluster status|down [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from e2e import images, nodes, procs, product
from e2e.base import REPO_ROOT, ClusterError, binary, missing_binaries, wait_for
from e2e.nodes import Network
from e2e.pki import KUBERNETES_SERVICE_IP, SERVICE_CIDR, Pki
from testkit.net import free_port

DEFAULT_STATE_DIR = REPO_ROOT / ".e2e"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


class LocalCluster:
    """The control plane in ``workdir``; ``start()`` brings it up, ``stop()`` ends it all."""

    def __init__(
        self,
        workdir: Path,
        name: str | None = None,
        detached: bool = False,
        extra_args: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """``detached``: the processes outlive this program (make up); otherwise they are
        also killed by the kernel if this program dies without stopping them.
        ``extra_args``: more flags for a component, by process name (e.g. the client rate
        limits of kube-controller-manager for `make bench-operator`)."""
        self.workdir = workdir.resolve()
        self.detached = detached
        self.extra_args = {k: list(v) for k, v in (extra_args or {}).items()}
        self.name = name or f"e2e-{secrets.token_hex(3)}"
        self.pki = Pki(self.workdir / "pki")
        self.logs = self.workdir / "logs"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.state_file = self.workdir / "state.json"
        self.ports: dict[str, int] = {}
        self.network: Network | None = None
        self.records: list[procs.ProcessRecord] = []
        self._popens: dict[int, object] = {}

    @property
    def address(self) -> str:
        """Where the API server listens: the host's address on the nodes' bridge."""
        assert self.network is not None
        return self.network.host_ip

    @property
    def server(self) -> str:
        return f"https://{self.address}:{self.ports['apiserver']}"

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> LocalCluster:
        control_plane = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
        bins = {name: binary(name) for name in control_plane}
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self.ports = {
            k: free_port() for k in ("etcd", "etcd-peer", "apiserver", "kcm", "scheduler")
        }
        self.network = Network.pick()
        self.save_state()
        self.network.create()
        self._make_credentials()
        try:
            self._start_etcd(bins["etcd"], timeout)
            self._start_apiserver(bins["kube-apiserver"], timeout)
            self._start_controller_manager(bins["kube-controller-manager"])
            self._start_scheduler(bins["kube-scheduler"])
            self._wait_healthz("kube-controller-manager", self.ports["kcm"], timeout)
            self._wait_healthz("kube-scheduler", self.ports["scheduler"], timeout)
            # The service-account controller and token signing work: pods can be admitted.
            wait_for(
                "the default service account (kube-controller-manager's controllers)",
                lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default"),
                timeout,
                on_poll=self._check_alive,
            )
        except BaseException as e:
            report = self.failure_report()
            self.stop()
            if isinstance(e, ClusterError):
                raise ClusterError(f"{e}\n{report}") from None
            raise
        return self

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process, last started first; bounded by ``grace`` (+5s) each."""
        errors = []
        for rec in reversed(self.records):
            try:
                rec.stop(grace, self._popens.get(rec.pid))  # type: ignore[arg-type]
            except RuntimeError as e:
                errors.append(str(e))
        self.records = []
        if self.network is not None:
            self.network.destroy()
        self.save_state()
        if errors:
            raise ClusterError("; ".join(errors))

    def alive(self) -> bool:
        return bool(self.records) and all(r.alive() for r in self.records)

    def failure_report(self, lines: int = 30) -> str:
        parts = []
        for rec in self.records:
            state = "running" if rec.alive() else "EXITED"
            parts.append(f"--- {rec.name} ({state}), last lines of {rec.log}:\n{rec.tail(lines)}")
        return "\n".join(parts)

    # ---- state shared with `python -m e2e.cluster down` -----------------------------------

    def save_state(self) -> None:
        if not self.workdir.exists():
            return
        state = {
            "name": self.name,
            "ports": self.ports,
            "subnet": self.network.subnet if self.network else None,
            "kubeconfig": str(self.kubeconfig),
            "processes": [r.to_dict() for r in self.records],
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, workdir: Path) -> LocalCluster:
        cluster = cls(workdir)
        state = json.loads(cluster.state_file.read_text())
        cluster.name = state["name"]
        cluster.ports = state["ports"]
        if state.get("subnet") is not None:
            cluster.network = Network(state["subnet"])
        cluster.records = [procs.ProcessRecord.from_dict(p) for p in state["processes"]]
        return cluster

    # ---- credentials --------------------------------------------------------------------

    def _make_credentials(self) -> None:
        self.pki.create_authorities()
        self.pki.issue(
            "apiserver",
            "kube-apiserver",
            server_names=(
                self.address,
                "127.0.0.1",
                "localhost",
                KUBERNETES_SERVICE_IP,
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
        )
        self.pki.issue(
            "front-proxy-client",
            "front-proxy-client",
            ca=(self.pki.front_proxy_ca_cert, self.pki.front_proxy_ca_key),
        )
        self.issue_kubeconfig("admin", ("system:masters",), self.kubeconfig)
        self.issue_kubeconfig("system:kube-controller-manager", (), self._kc("kcm"))
        self.issue_kubeconfig("system:kube-scheduler", (), self._kc("scheduler"))
        # The API server's client certificate towards kubelets (logs, exec, port-forward).
        self.pki.issue(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            organizations=("system:masters",),
        )

    def _kc(self, name: str) -> Path:
        return self.workdir / f"{name}.kubeconfig"

    def issue_kubeconfig(self, user: str, groups: tuple[str, ...], path: Path) -> Path:
        """A kubeconfig for ``user`` in ``groups`` (client certificate from the cluster CA)."""
        safe = user.replace(":", "-")
        cert, key = self.pki.issue(f"client-{safe}", user, organizations=groups)
        return self.pki.kubeconfig(path, self.server, user, cert, key, self.name)

    def kube_proxy_kubeconfig(self) -> Path:
        """kube-proxy's credentials: user system:kube-proxy (bound to system:node-proxier)."""
        path = self._kc("kube-proxy")
        if not path.exists():
            self.issue_kubeconfig("system:kube-proxy", (), path)
        return path

    def node_kubeconfig(self, node: str) -> Path:
        """Credentials a kubelet for ``node`` would have: user system:node:<node>."""
        path = self._kc(f"node-{node}")
        if not path.exists():
            self.issue_kubeconfig(f"system:node:{node}", ("system:nodes",), path)
        return path

    # ---- processes ----------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> None:
        argv = [*argv, *self.extra_args.get(name, ())]
        rec, popen = procs.start(
            name, argv, self.logs / f"{name}.log", die_with_parent=not self.detached
        )
        self.records.append(rec)
        self._popens[rec.pid] = popen
        self.save_state()

    def _check_alive(self) -> None:
        for rec in self.records:
            if not rec.alive():
                raise ClusterError(f"{rec.name} exited during start-up")

    def _start_etcd(self, etcd: Path, timeout: float) -> None:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        self._spawn(
            "etcd",
            [
                str(etcd),
                "--name=e2e",
                f"--data-dir={self.workdir / 'etcd-data'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=e2e={peer}",
                # Throwaway data: no fsync makes every write (and the suite) much faster.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )

        def healthy() -> bool:
            with urllib.request.urlopen(f"{client}/health", timeout=2) as r:
                return json.load(r).get("health") == "true"

        wait_for("etcd /health", healthy, timeout, on_poll=self._check_alive)

    def _start_apiserver(self, apiserver: Path, timeout: float) -> None:
        pki = self.pki.dir
        self._spawn(
            "kube-apiserver",
            [
                str(apiserver),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--secure-port={self.ports['apiserver']}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={self.pki.ca_cert}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={self.pki.sa_pub}",
                f"--service-account-signing-key-file={self.pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # The aggregation layer's front proxy; controller-manager and scheduler read
                # this CA from the cluster and complain until it is set.
                f"--requestheader-client-ca-file={self.pki.front_proxy_ca_cert}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
                "--authorization-mode=Node,RBAC",
                # On top of the default admission chain: what a kubelet may change is limited
                # to its own Node and the pods bound to it, as in a real cluster.
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                "--profiling=false",
            ],
        )
        wait_for(
            "kube-apiserver /readyz",
            lambda: self._get("/readyz"),
            timeout,
            on_poll=self._check_alive,
        )

    def _component_args(self, kubeconfig: Path, name: str, port: int) -> list[str]:
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / (name + '-certs')}",
            # A single instance: no need to wait for a lease.
            "--leader-elect=false",
        ]

    def _start_controller_manager(self, kcm: Path) -> None:
        self._spawn(
            "kube-controller-manager",
            [
                str(kcm),
                *self._component_args(self._kc("kcm"), "kcm", self.ports["kcm"]),
                f"--service-account-private-key-file={self.pki.sa_key}",
                f"--root-ca-file={self.pki.ca_cert}",
                "--use-service-account-credentials=true",
                f"--cluster-signing-cert-file={self.pki.ca_cert}",
                f"--cluster-signing-key-file={self.pki.ca_key}",
                "--controllers=*",
            ],
        )

    def _start_scheduler(self, scheduler: Path) -> None:
        self._spawn(
            "kube-scheduler",
            [
                str(scheduler),
                *self._component_args(self._kc("scheduler"), "scheduler", self.ports["scheduler"]),
            ],
        )

    def _wait_healthz(self, name: str, port: int, timeout: float) -> None:
        # Their serving certificates are self-signed at start; /healthz needs no credentials.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

        def healthy() -> bool:
            url = f"https://127.0.0.1:{port}/healthz"
            with urllib.request.urlopen(url, timeout=2, context=context) as r:
                return r.status == 200

        wait_for(f"{name} /healthz", healthy, timeout, on_poll=self._check_alive)

    def _admin_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(
            self.pki.dir / "client-admin.crt", self.pki.dir / "client-admin.key"
        )
        return context

    def _get(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(
                self.server + path, timeout=5, context=self._admin_context()
            ) as r:
                return r.status == 200
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return False
            raise

    # ---- clients ------------------------------------------------------------------------

    def api_client(self):
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))


class ExternalCluster:
    """A cluster someone else runs (E2E_KUBECONFIG): used as it is, never started or stopped."""

    def __init__(self, kubeconfig: Path) -> None:
        if not kubeconfig.is_file():
            raise ClusterError(f"E2E_KUBECONFIG={kubeconfig} is not a file")
        self.kubeconfig = kubeconfig

    def api_client(self):
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def stop(self) -> None:
        pass


# ---- the `make up` / `make down` command ------------------------------------------------


def _cmd_up(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir.resolve()
    if (state_dir / "cluster" / "state.json").exists():
        existing = LocalCluster.load(state_dir / "cluster")
        if existing.alive():
            print(f"a cluster is already running from {state_dir}; `make down` first")
            _print_usage(state_dir)
            return 0
        _stop_all(state_dir)
    missing = missing_binaries()
    if missing:
        print(f"missing binaries ({', '.join(missing)}): run `make e2e-bins`")
        return 1
    started = time.monotonic()
    print("building the image (cached by content) ...", flush=True)
    built = images.for_nodes()
    cluster = LocalCluster(state_dir / "cluster", detached=True)
    print(f"starting the control plane in {cluster.workdir} ...", flush=True)
    cluster.start(timeout=args.timeout)
    try:
        specs = nodes.default_nodes(args.nodes, args.zones)
        print(f"starting {len(specs)} nodes (kubelet, containerd, kube-proxy) ...", flush=True)
        started_nodes = nodes.Nodes(cluster, specs, state_dir / "nodes")
        try:
            started_nodes.start(built.archives, args.timeout)
        except BaseException:
            print(started_nodes.failure_report())
            raise
        _link_tools(state_dir, cluster)
        product.install(cluster, state_dir, built.ref, args.timeout)
    except BaseException:
        print(cluster.failure_report())
        _stop_all(state_dir)
        raise
    print(f"cluster up in {time.monotonic() - started:.1f}s")
    _print_usage(state_dir)
    return 0


def _link_tools(state_dir: Path, cluster: LocalCluster) -> None:
    """state_dir/bin holds kubectl and helm; state_dir/env sets KUBECONFIG and PATH."""
    bin_dir = state_dir / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("kubectl", "helm"):
        link = bin_dir / tool
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(binary(tool))
    (state_dir / "env").write_text(
        f'export KUBECONFIG="{cluster.kubeconfig}"\nexport PATH="{bin_dir}:$PATH"\n'
    )


def _print_usage(state_dir: Path) -> None:
    try:
        shown = state_dir.relative_to(Path.cwd())
    except ValueError:
        shown = state_dir
    print(
        f"\nUse it with:\n    source {shown}/env\n    kubectl get nodes -L "
        "topology.kubernetes.io/zone,topology.cache.appliance.io/rack\n"
        "    kubectl get cc -o wide; kubectl describe cc cache\n"
        f"Logs: {shown}/cluster/logs/ and {shown}/nodes/<node>/logs/; the operator's: "
        "kubectl logs -n cache-system deploy/cache-operator; stop it all with `make down`."
    )


def _stop_all(state_dir: Path) -> None:
    try:
        nodes.stop_from_state(state_dir / "nodes" / "nodes.json")
    finally:  # the control plane goes even if a node did not stop cleanly
        if (state_dir / "cluster" / "state.json").exists():
            LocalCluster.load(state_dir / "cluster").stop()


def _cmd_down(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir.resolve()
    if not state_dir.exists():
        print(f"no cluster state in {state_dir}: nothing to stop")
        return 0
    _stop_all(state_dir)
    if args.keep:
        print(f"stopped; logs kept in {state_dir}")
    else:
        shutil.rmtree(state_dir)
        print("stopped and removed")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir.resolve()
    cluster_state = state_dir / "cluster"
    if not (cluster_state / "state.json").exists():
        print("no cluster")
        return 1
    cluster = LocalCluster.load(cluster_state)
    for rec in cluster.records:
        print(f"{rec.name:26} pid {rec.pid:7} {'running' if rec.alive() else 'EXITED'}")
    node_state = state_dir / "nodes" / "nodes.json"
    if node_state.exists():
        for node in json.loads(node_state.read_text())["nodes"]:
            for raw in node["processes"]:
                rec = procs.ProcessRecord.from_dict(raw)
                name = f"{node['spec']['name']} {rec.name}"
                print(f"{name:26} pid {rec.pid:7} {'running' if rec.alive() else 'EXITED'}")
    return 0 if cluster.alive() else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__)
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("E2E_STATE_DIR", DEFAULT_STATE_DIR)),
        help="where pids, logs and the kubeconfig live (default: .e2e in the repository)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a cluster with nodes, kept running in the background")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--zones", type=int, default=2)
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each step")
    down = sub.add_parser("down", help="stop everything `up` started")
    down.add_argument("--keep", action="store_true", help="keep the state directory (logs)")
    sub.add_parser("status", help="show the processes of the running cluster")
    args = parser.parse_args(argv)
    try:
        return {"up": _cmd_up, "down": _cmd_down, "status": _cmd_status}[args.command](args)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
