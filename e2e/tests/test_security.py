"""Who may talk to an appliance, on real nodes: examples/cachecluster-secured.yaml with its
two Secrets (credentials, and a TLS certificate with its CA for mutual TLS).

- A client with the CA, a client certificate and the credentials is served; one without a
  client certificate, one speaking plaintext, and one that has not logged in are not;
  flush_all is refused (spec.flushAll: false).
- The operator still reports what each appliance got (it reads /stats over HTTP: it holds
  neither the password nor a client certificate).
- A renewed certificate and a new password, written to the Secrets, are served by the same
  pods (no restart) once the kubelet has synced the volumes.
- A CacheCluster whose Secret does not exist is Degraded with reason SecretInvalid,
  naming the Secret.

A DRAFT: written before the e2e cluster on real kubelets was ready, not run yet. Needs what
real kubelets give: Secret volumes (optional, updated in place, defaultMode with fsGroup),
exec probes that reach the pod's /tmp; the test process must reach the nodes' addresses.
"""

from __future__ import annotations

import hashlib
import secrets
import socket
import ssl
import time
from pathlib import Path

import pytest

from e2e import product
from e2e.appliance import Endpoint, conditions, endpoints, load_manifest
from testkit.net import recv_until
from tlscerts import Certificates, Pair, client_context, make_cert, make_certificates

SECURED = product.EXAMPLES / "cachecluster-secured.yaml"
READY_TIMEOUT = 240
# The kubelet syncs a changed Secret into the pod's volume within its sync period plus the
# Secret cache's TTL (about a minute each by default); the server then takes it within 1 s.
ROTATION_TIMEOUT = 180


def _secret(name: str, data: dict[str, str]) -> dict:
    return {"metadata": {"name": name}, "type": "Opaque", "stringData": data}


def _tls_data(certs: Certificates, server: Pair) -> dict[str, str]:
    return {
        "tls.crt": server.cert.read_text(),
        "tls.key": server.key.read_text(),
        "ca.crt": certs.ca.cert.read_text(),
    }


def _node_addresses(caches) -> list[str]:
    addresses = []
    for node in caches.core.list_node().items:
        addresses += [a.address for a in node.status.addresses or [] if a.type == "InternalIP"]
    return addresses


def _connect(ep: Endpoint, context: ssl.SSLContext | None) -> socket.socket:
    raw = socket.create_connection((ep.address, ep.port), timeout=5)
    # The certificate names the nodes' addresses: check it as a client would.
    return context.wrap_socket(raw, server_hostname=ep.address) if context else raw


def _ask(ep: Endpoint, context: ssl.SSLContext | None, payload: bytes, end: bytes) -> bytes:
    """The reply up to ``end``; b"" when the server closed or refused the connection."""
    try:
        with _connect(ep, context) as sock:
            sock.sendall(payload)
            return recv_until(sock, end)
    except (OSError, ssl.SSLError):
        return b""


def _login(user: str, password: str) -> bytes:
    token = f"{user} {password}".encode()
    return b"set auth 0 0 %d\r\n%s\r\n" % (len(token), token)


def _fingerprint(ep: Endpoint, certs: Certificates) -> str:
    with _connect(ep, client_context(certs.ca, certs.client)) as sock:
        return hashlib.sha256(sock.getpeercert(binary_form=True)).hexdigest()


@pytest.fixture
def certs(tmp_path: Path, caches) -> Certificates:
    return make_certificates(tmp_path / "certs", addresses=_node_addresses(caches))


def test_served_to_those_it_lets_in_and_rotated_without_a_restart(
    caches, certs: Certificates, tmp_path: Path
) -> None:
    password = secrets.token_hex(12)
    caches.core.create_namespaced_secret(
        caches.namespace, _secret("cache-credentials", {"credentials": f"app:{password}\n"})
    )
    caches.core.create_namespaced_secret(
        caches.namespace, _secret("cache-tls", _tls_data(certs, certs.server))
    )
    manifest = load_manifest(SECURED)
    name = manifest["metadata"]["name"]
    caches.create(manifest)
    status = caches.wait_phase(name, "Ready", READY_TIMEOUT, replicas=manifest["spec"]["replicas"])
    eps = endpoints(status)
    assert eps

    mutual = client_context(certs.ca, certs.client)
    login = _login("app", password)
    for i, ep in enumerate(eps):
        key = b"sec-%d" % i
        served = _ask(
            ep, mutual, login + b"set %s 0 0 2\r\nok\r\nget %s\r\n" % (key, key), b"END\r\n"
        )
        assert served == b"STORED\r\nSTORED\r\nVALUE %s 0 2\r\nok\r\nEND\r\n" % key, ep
        # Not logged in, wrong password, no client certificate, plaintext: nothing.
        assert _ask(ep, mutual, b"get %s\r\n" % key, b"\r\n") == (
            b"CLIENT_ERROR unauthenticated\r\n"
        )
        assert _ask(ep, mutual, _login("app", "wrong"), b"\r\n") == (
            b"CLIENT_ERROR authentication failure\r\n"
        )
        assert b"VALUE" not in _ask(ep, client_context(certs.ca), login + b"get x\r\n", b"END\r\n")
        assert b"VALUE" not in _ask(ep, None, login + b"get x\r\n", b"END\r\n")
        assert _ask(ep, mutual, login + b"flush_all\r\n", b"allowed\r\n") == (
            b"STORED\r\nCLIENT_ERROR flush_all not allowed\r\n"
        )

    # The operator read each appliance's report although it may not talk memcached to it.
    def reported(s: dict) -> bool:
        return all(e.get("memoryLimit") for e in s.get("endpoints") or [])

    status = caches.wait(name, "every endpoint with its memoryLimit", reported, 120)
    assert conditions(status)["Pinned"][1] != "NotReported", conditions(status)

    # Rotation: a renewed certificate and a second password, written to the Secrets.
    pods_before = {p.metadata.name: (p.metadata.uid, _restarts(p)) for p in caches.live_pods(name)}
    old = {f"{ep.address}:{ep.port}": _fingerprint(ep, certs) for ep in eps}
    renewed = make_cert(certs.ca, tmp_path / "certs", "renewed", addresses=_node_addresses(caches))
    caches.core.replace_namespaced_secret(
        "cache-tls", caches.namespace, _secret("cache-tls", _tls_data(certs, renewed))
    )
    second = secrets.token_hex(12)
    caches.core.replace_namespaced_secret(
        "cache-credentials",
        caches.namespace,
        _secret("cache-credentials", {"credentials": f"app:{password}\nnext:{second}\n"}),
    )
    deadline = time.monotonic() + ROTATION_TIMEOUT
    waiting = set(old)
    while waiting:
        assert time.monotonic() < deadline, f"still the old certificate or password: {waiting}"
        for ep in eps:
            where = f"{ep.address}:{ep.port}"
            renewed_here = where in waiting and _fingerprint(ep, certs) != old[where]
            if renewed_here and _ask(ep, mutual, _login("next", second), b"\r\n") == (
                b"STORED\r\n"
            ):
                waiting.discard(where)
        time.sleep(2)
    # Served by the same containers: no pod replaced, no container restarted.
    pods_after = {p.metadata.name: (p.metadata.uid, _restarts(p)) for p in caches.live_pods(name)}
    assert pods_after == pods_before


def _restarts(pod) -> int:
    return sum(s.restart_count for s in pod.status.container_statuses or [])


def test_a_missing_secret_is_a_condition_naming_it(caches, certs: Certificates) -> None:
    caches.core.create_namespaced_secret(
        caches.namespace, _secret("cache-tls", _tls_data(certs, certs.server))
    )
    manifest = load_manifest(SECURED)
    name = manifest["metadata"]["name"]
    caches.create(manifest, replicas=1)  # cache-credentials is never created

    def says_why(s: dict) -> bool:
        _status, reason, _message = conditions(s).get("Degraded", ("", "", ""))
        return reason == "SecretInvalid"

    status = caches.wait(name, "Degraded with reason SecretInvalid", says_why, READY_TIMEOUT)
    message = conditions(status)["Degraded"][2]
    assert "the Secret 'cache-credentials' (spec.auth.secretName)" in message, message
