"""spec.auth, spec.tls and spec.flushAll, run for real: the server container the operator
builds (its environment, with the Secrets' mount paths moved to a temporary directory)
starts a real cacheserver, its probe command passes, clients get in or not as the spec
says, and the operator reads the appliance's report over HTTP. A server whose Secret is
missing a key stops with a message that becomes a condition naming the Secret."""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from cacheoperator.appliances import Target, read_target
from cacheoperator.models import CacheClusterSpec
from cacheoperator.naming import AUTH_MOUNT, TLS_MOUNT
from cacheoperator.pods import ADMIN_SOCKET, PROBE_COMMAND, WARM_MOUNT, pod_template
from cacheoperator.status import Observed, compute_status
from operator_testkit import make_pod, make_statefulset, spec_of
from servers import free_port, recv_until, wait_for_port
from tlscerts import Certificates, client_context, make_certificates

LOGIN = b"set auth 0 0 6\r\napp pw\r\n"


def secured_spec(**extra) -> CacheClusterSpec:
    fields = {
        "replicas": 1,
        "hostNetwork": False,
        "pinning": False,
        "resources": {"cpu": "500m", "memory": "256Mi"},
        "port": free_port(),
        "monitoring": {"port": free_port()},
        "auth": {"secretName": "creds"},
        "tls": {"secretName": "tls", "clientCertificates": "required"},
        "flushAll": False,
    }
    fields.update(extra)
    return spec_of(**fields)


class Pod:
    """The server container of the pod template, run as a local process."""

    def __init__(self, spec: CacheClusterSpec, root: Path) -> None:
        template = pod_template(spec, "demo", "demo", "unused", None, "cache")
        (container,) = template["spec"]["containers"]
        self.container = container
        self.moves = {
            AUTH_MOUNT: str(root / "auth"),
            TLS_MOUNT: str(root / "tls"),
            ADMIN_SOCKET: str(root / "admin.sock"),
            WARM_MOUNT: str(root / "warm"),
            "0.0.0.0": "127.0.0.1",
            PROBE_COMMAND: str(Path(sys.executable).with_name(PROBE_COMMAND)),
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("CACHESERVER_")}
        for item in container["env"]:
            if "value" in item:
                env[item["name"]] = self.moved(item["value"])
        env["CACHESERVER_CONTAINER_MEMORY_LIMIT"] = str(256 << 20)
        env["CACHESERVER_CLUSTER_CONFIG"] = str(root / "no-membership-yet.json")
        (root / "warm").mkdir()
        self.log = root / "termination-log"
        self.log.write_bytes(b"")
        env["CACHESERVER_TERMINATION_LOG"] = str(self.log)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cacheserver", *container["args"]],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def moved(self, text: str) -> str:
        for old, new in self.moves.items():
            text = text.replace(old, new)
        return text

    def as_mounted(self, text: str) -> str:
        """``text`` with the temporary directories named where the kubelet mounts them."""
        for old in (AUTH_MOUNT, TLS_MOUNT):
            text = text.replace(self.moves[old], old)
        return text

    def probe(self, kind: str) -> int:
        command = [self.moved(arg) for arg in self.container[kind]["exec"]["command"]]
        return subprocess.run(command, capture_output=True, timeout=30).returncode

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def secrets(root: Path, certs: Certificates, credentials: bool = True) -> None:
    """What the kubelet would mount from the two Secrets (an optional Secret without the
    credentials key gives an empty directory)."""
    (root / "auth").mkdir()
    if credentials:
        (root / "auth" / "credentials").write_bytes(b"app:pw\n")
    tls = root / "tls"
    tls.mkdir()
    for name, source in (
        ("tls.crt", certs.server.cert),
        ("tls.key", certs.server.key),
        ("ca.crt", certs.ca.cert),
    ):
        (tls / name).write_bytes(source.read_bytes())


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def talk(port: int, context: ssl.SSLContext | None, payload: bytes) -> bytes | Exception:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock = context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw
        with sock:
            sock.sendall(payload)
            return recv_until(sock, b"\r\n")
    except OSError as err:
        raw.close()
        return err


def test_the_built_pod_serves_whom_the_spec_lets_in(tmp_path: Path, certs: Certificates) -> None:
    plain = free_port()
    spec = secured_spec(
        tls={"secretName": "tls", "clientCertificates": "required", "plaintextPort": plain}
    )
    secrets(tmp_path, certs)
    pod = Pod(spec, tmp_path)
    try:
        for port in (spec.port, plain, spec.metrics_port):
            wait_for_port(port, pod.proc)
        assert pod.probe("readinessProbe") == 0 and pod.probe("livenessProbe") == 0
        mutual = client_context(certs.ca, certs.client)
        assert talk(spec.port, mutual, b"get k\r\n") == b"CLIENT_ERROR unauthenticated\r\n"
        assert _all_replies(spec.port, mutual, LOGIN + b"set k 0 0 1\r\nx\r\nget k\r\n") == (
            b"STORED\r\nSTORED\r\nVALUE k 0 1\r\nx\r\nEND\r\n"
        )
        assert _all_replies(spec.port, mutual, LOGIN + b"flush_all\r\nget k\r\n") == (
            b"STORED\r\nCLIENT_ERROR flush_all not allowed\r\nVALUE k 0 1\r\nx\r\nEND\r\n"
        )
        # Without a client certificate, or without TLS, nothing.
        assert not isinstance(talk(spec.port, client_context(certs.ca), b"version\r\n"), bytes)
        assert not isinstance(talk(spec.port, None, b"version\r\n"), bytes) or not talk(
            spec.port, None, b"version\r\n"
        )
        # The plaintext port next to TLS still wants the credentials.
        assert talk(plain, None, b"version\r\n") == b"CLIENT_ERROR unauthenticated\r\n"
        assert talk(plain, None, LOGIN) == b"STORED\r\n"
        # What the operator reads of it, without credentials or a client certificate: over
        # the memcached port nothing, over HTTP on the metrics port its report.
        target = Target("cache", "demo", "demo-0", "uid/c1", 0, "127.0.0.1", spec.port)
        with pytest.raises((OSError, ValueError)):
            read_target(target, timeout=2)
        over_http = dataclasses.replace(target, http_port=spec.metrics_port)
        report = read_target(over_http, timeout=2)
        assert report.memory_limit == 256 << 20
        assert report.restore.result == "none"  # warm restart on, no snapshot yet
    finally:
        pod.stop()


def _all_replies(port: int, context: ssl.SSLContext, payload: bytes) -> bytes:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(payload)
        return recv_until(sock, b"END\r\n")


@pytest.mark.parametrize(
    ("missing", "field", "secret"),
    [
        ("credentials", "spec.auth.secretName", "creds"),
        ("tls.crt", "spec.tls.secretName", "tls"),
        ("ca.crt", "spec.tls.secretName", "tls"),
    ],
)
def test_a_secret_without_its_key_is_a_condition_naming_it(
    tmp_path: Path, certs: Certificates, missing: str, field: str, secret: str
) -> None:
    spec = secured_spec()
    secrets(tmp_path, certs, credentials=missing != "credentials")
    if missing != "credentials":
        (tmp_path / "tls" / missing).unlink()
    pod = Pod(spec, tmp_path)
    try:
        assert pod.proc.wait(timeout=30) != 0
    finally:
        pod.stop()
    said = pod.as_mounted(pod.log.read_text())
    assert said, "the server left no termination message"
    pods = [make_pod("demo-0", ready=False, waiting="CrashLoopBackOff", said=said)]
    status = compute_status(
        cluster="demo",
        generation=1,
        spec=spec,
        observed=Observed(statefulsets=[make_statefulset("demo", 1, ready=0)], pods=pods),
        previous=None,
        now="2030-01-01T00:00:00Z",
    )
    (degraded,) = [c for c in status["conditions"] if c["type"] == "Degraded"]
    assert degraded["reason"] == "SecretInvalid"
    assert f"the Secret {secret!r} ({field})" in degraded["message"]
    assert f"/{missing}" in degraded["message"]  # the server's own words name the file
