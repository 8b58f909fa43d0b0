"""memcached's -Z TLS, side by side with Debian's memcached 1.6.18 -Z: who gets in (a
plaintext client on a TLS port, client certificates under each ssl_verify_mode), TLS and
plaintext listeners next to each other, certificates rotated without a restart, -Y over
TLS. The requests themselves are test_differential.py's script, run over TLS there."""

from __future__ import annotations

import os
import socket
import ssl
import time
from pathlib import Path

import pytest

from servers import (
    RunningServer,
    free_port,
    recv_until,
    run_to_exit,
    start_cacheserver,
    start_memcached,
    wait_for_port,
)
from tlscerts import Certificates, Pair, client_context, make_cert, make_certificates, tls_args


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def start_both(*args: str) -> list[RunningServer]:
    return [start_memcached(*args, udp=False), start_cacheserver(*args, udp=False)]


def ask(server: RunningServer, context: ssl.SSLContext | None, payload: bytes, port: int = 0):
    """The reply to ``payload`` (up to its END or first line), or the exception that ended
    the exchange: a refused handshake, a reset, a connection closed without a reply."""
    raw = socket.create_connection(("127.0.0.1", port or server.port), timeout=5)
    try:
        sock = context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw
        with sock:
            sock.sendall(payload)
            reply = recv_until(sock, b"END\r\n" if payload.startswith(b"stats") else b"\r\n")
            return reply or ConnectionError("closed without a reply")
    except (OSError, ssl.SSLError) as err:
        raw.close()
        return err


def served(reply) -> bool:
    return isinstance(reply, bytes) and reply.startswith(b"VERSION ")


def stats_over(server: RunningServer, context: ssl.SSLContext, sub: str = "") -> dict[str, str]:
    reply = ask(server, context, f"stats {sub}".strip().encode() + b"\r\n")
    assert isinstance(reply, bytes), reply
    return {
        parts[1]: parts[2]
        for parts in (line.split(" ", 2) for line in reply.decode().splitlines())
        if len(parts) == 3 and parts[0] == "STAT"
    }


def test_a_plaintext_client_on_a_tls_port_is_refused(certs: Certificates) -> None:
    servers = start_both(*tls_args(certs))
    trusting = client_context(certs.ca)
    try:
        for server in servers:
            before = int(stats_over(server, trusting)["ssl_handshake_errors"])
            reply = ask(server, None, b"version\r\n")
            assert not served(reply), (server.name, reply)
            assert served(ask(server, trusting, b"version\r\n")), server.name
            if server.name == "cacheserver":  # memcached counts it or not, by timing
                assert int(stats_over(server, trusting)["ssl_handshake_errors"]) == before + 1
    finally:
        for server in servers:
            server.stop()


def test_tls_and_plaintext_listeners_side_by_side(certs: Certificates) -> None:
    """memcached's way: with -Z every listener is TLS but those written notls:."""
    tls = client_context(certs.ca)
    for start in (start_memcached, start_cacheserver):
        plain = free_port()
        server = start(*tls_args(certs), "-l", f"notls:127.0.0.1:{plain}", udp=False)
        try:
            wait_for_port(plain, server.proc)
            assert served(ask(server, tls, b"version\r\n")), server.name
            assert served(ask(server, None, b"version\r\n", port=plain)), server.name
            assert not served(ask(server, None, b"version\r\n")), server.name
            assert not served(ask(server, tls, b"version\r\n", port=plain)), server.name
        finally:
            server.stop()
    # With -t 2, each worker's listeners are each listener's port + its index.
    plain = free_port()
    cs = start_cacheserver(*tls_args(certs), "-l", f"notls:127.0.0.1:{plain}", "-t", "2", udp=False)
    try:
        for port in (plain, cs.port + 1, plain + 1):  # worker 0's TLS port is open already
            wait_for_port(port, cs.proc)
        for worker in range(2):
            assert served(ask(cs, tls, b"version\r\n", port=cs.port + worker))
            assert served(ask(cs, None, b"version\r\n", port=plain + worker))
    finally:
        cs.stop()


@pytest.mark.parametrize(
    ("mode", "without_cert", "with_cert", "stranger"),
    [(1, True, True, False), (2, False, True, False), (3, False, True, False)],
)
def test_client_certificates_as_memcached_checks_them(
    certs: Certificates, mode: int, without_cert: bool, with_cert: bool, stranger: bool
) -> None:
    servers = start_both(*tls_args(certs, verify_mode=mode))
    clients = {
        "no certificate": (client_context(certs.ca), without_cert),
        "a certificate from the CA": (client_context(certs.ca, certs.client), with_cert),
        "a certificate from another CA": (client_context(certs.ca, certs.stranger), stranger),
    }
    try:
        for server in servers:
            for what, (context, expected) in clients.items():
                reply = ask(server, context, b"version\r\n")
                assert served(reply) == expected, f"{server.name}, {what}: {reply!r}"
    finally:
        for server in servers:
            server.stop()


def test_stats_settings_report_tls_as_memcached(certs: Certificates) -> None:
    servers = start_both(*tls_args(certs, verify_mode=2))
    context = client_context(certs.ca, certs.client)
    try:
        reported = [
            {k: v for k, v in stats_over(s, context, "settings").items() if k.startswith("ssl_")}
            for s in servers
        ]
        assert reported[1] == reported[0]
        assert reported[0]["ssl_verify_mode"] == "3"
    finally:
        for server in servers:
            server.stop()


def _serial(server: RunningServer, ca: Pair) -> int:
    raw = socket.create_connection(server.address, timeout=5)
    with client_context(None).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        der = sock.getpeercert(binary_form=True)
    # Each certificate the CA signs gets its own serial; the DER differs with it.
    return hash(der)


def _replace(target: Path, source: Path) -> None:
    fresh = target.with_suffix(".new")
    fresh.write_bytes(source.read_bytes())
    os.replace(fresh, target)


def test_certificates_are_rotated_without_a_restart(certs: Certificates, tmp_path: Path) -> None:
    """refresh_certs (memcached's command) on both; the file watch on cacheserver alone,
    as the kubelet swaps a Secret's files; a broken file keeps the old certificate."""
    served_cert = Pair(tmp_path / "tls.crt", tmp_path / "tls.key")
    _replace(served_cert.cert, certs.server.cert)
    _replace(served_cert.key, certs.server.key)
    args = ["-Z", "-o", f"ssl_chain_cert={served_cert.cert},ssl_key={served_cert.key}"]
    servers = start_both(*args)
    trusting = client_context(certs.ca)
    try:
        before = [_serial(s, certs.ca) for s in servers]
        renewed = make_cert(certs.ca, tmp_path, "renewed")
        _replace(served_cert.key, renewed.key)
        _replace(served_cert.cert, renewed.cert)
        mc, cs = servers
        # cacheserver sees the new files by itself within a second or two.
        deadline = time.monotonic() + 5
        while _serial(cs, certs.ca) == before[1]:
            assert time.monotonic() < deadline, "the new certificate was not taken"
            time.sleep(0.2)
        assert _serial(mc, certs.ca) == before[0]  # memcached waits for refresh_certs
        for server in servers:
            assert ask(server, trusting, b"refresh_certs\r\n") == b"OK\r\n"
        assert _serial(mc, certs.ca) == _serial(cs, certs.ca) != before[0]
        # A broken certificate: both say why and keep serving the one they have.
        served_cert.cert.write_bytes(b"not a certificate\n")
        replies = [ask(s, trusting, b"refresh_certs\r\n") for s in servers]
        prefix = f"Error loading the certificate chain: {served_cert.cert} : ".encode()
        for server, reply in zip(servers, replies, strict=True):
            assert isinstance(reply, bytes) and reply.startswith(prefix), (server.name, reply)
            assert served(ask(server, trusting, b"version\r\n")), server.name
        assert stats_over(cs, trusting)["ssl_cert_load_errors"] != "0"
    finally:
        for server in servers:
            server.stop()


def test_authentication_over_tls_as_memcached(certs: Certificates, tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.write_bytes(b"alice:secret\n")
    servers = start_both(*tls_args(certs), "-Y", str(creds))
    context = client_context(certs.ca)
    steps = [  # each with the end of its reply
        (b"get k\r\n", b"\r\n"),
        (b"set a 0 0 12\r\nalice wrongg\r\n", b"\r\n"),
        (b"set a 0 0 12\r\nalice secret\r\nset k 0 0 1\r\nx\r\nget k\r\n", b"END\r\n"),
    ]
    try:
        replies = []
        for server in servers:
            raw = socket.create_connection(server.address, timeout=5)
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                got = []
                for step, end in steps:
                    sock.sendall(step)
                    got.append(recv_until(sock, end))
                replies.append(got)
        assert replies[1] == replies[0]
        assert replies[0][-1] == b"STORED\r\nSTORED\r\nVALUE k 0 1\r\nx\r\nEND\r\n"
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize(
    ("broken", "said"),
    [
        ("chain", "Error loading the certificate chain: "),
        ("key", "Error loading the key: "),
        ("mismatch", "Error validating the certificate: "),
        ("ca", "Error loading the CA certificate: "),
    ],
)
def test_bad_certificates_stop_the_server_naming_them(
    certs: Certificates, tmp_path: Path, broken: str, said: str
) -> None:
    chain, key, ca = certs.server.cert, certs.server.key, certs.ca.cert
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    if broken == "chain":
        chain = tmp_path / "missing.crt"
    elif broken == "key":
        key = garbage
    elif broken == "mismatch":
        key = certs.client.key
    else:
        ca = garbage
    log = tmp_path / "termination-log"
    log.write_bytes(b"")
    options = f"ssl_chain_cert={chain},ssl_key={key},ssl_ca_cert={ca},ssl_verify_mode=2"
    run = run_to_exit(log, "-p", str(free_port()), "-Z", "-o", options)
    assert run.returncode != 0
    message = log.read_text()
    assert message.startswith(f"cannot use the TLS certificates (-Z): {said}"), message


def test_a_real_client_logs_in_over_mutual_tls(certs: Certificates, tmp_path: Path) -> None:
    """pymemcache with a TLS context and a client certificate: its login is a plain set
    (noreply off: the server answers the login even when asked not to, as memcached)."""
    from pymemcache.client.base import Client
    from pymemcache.exceptions import MemcacheClientError

    creds = tmp_path / "credentials"
    creds.write_bytes(b"app:s3cret\n")
    cs = start_cacheserver(*tls_args(certs, verify_mode=2), "-Y", str(creds), udp=False)
    context = client_context(certs.ca, certs.client)
    try:
        client = Client(cs.address, tls_context=context, timeout=5)
        assert client.set("auth", "app s3cret", noreply=False)
        assert client.set("k", "v", noreply=False) and client.get("k") == b"v"
        stranger = Client(cs.address, tls_context=context, timeout=5)
        with pytest.raises(MemcacheClientError, match="unauthenticated"):
            stranger.get("k")
        client.close()
        stranger.close()
    finally:
        cs.stop()
