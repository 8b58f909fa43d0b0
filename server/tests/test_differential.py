"""Differential test: one scripted session sent to Debian's memcached and to cacheserver.

Each step is sent on its own, followed by ``version`` as a sentinel so the reply to the step
can be cut out exactly (noreply steps answer nothing). Replies must be byte-equal, except the
version string and, where the servers legitimately differ, the steps listed in
``KNOWN_DIFFERENCES`` (each with the reason).
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Callable

import pytest

from servers import RunningServer, recv_until, start_cacheserver, start_memcached
from tlscerts import client_context, make_certificates, tls_args

Step = bytes | Callable[[dict[str, int]], bytes]
SENTINEL = b"version\r\n"
VERSION_LINE = re.compile(rb"VERSION [^\r\n]*\r\n$")

# Over TLS, memcached 1.6.18 reads a large data block straight into the item; requests that
# came after it in the same TLS record stay in OpenSSL's buffer until more bytes arrive, so
# their replies never come. The TLS runs send the sentinel after such a step's reply.
TLS_RECORD = 16384

NOW = int(time.time())
LONG_KEY = b"k" * 251
MAX_KEY = b"m" * 250


def _script() -> list[Step]:
    far_future = NOW + 3600 * 24 * 365  # absolute (more than 30 days ahead)
    long_past = 1_000_000_000  # absolute, in 2001
    return [
        # -- storage commands and their replies
        b"set k1 0 0 5\r\nhello\r\n",
        b"get k1\r\n",
        b"get k1 missing k1\r\n",
        b"get missing\r\n",
        b"add k1 0 0 1\r\nx\r\n",
        b"add k2 5 0 2\r\nab\r\n",
        b"replace k3 0 0 1\r\nx\r\n",
        b"replace k2 7 0 3\r\nxyz\r\n",
        b"append k2 0 0 2\r\n12\r\n",
        b"prepend k2 9 9 2\r\n__\r\n",
        b"append nothere 0 0 1\r\nx\r\n",
        b"prepend nothere 0 0 1\r\nx\r\n",
        b"get k2\r\n",
        b"set e 0 0 0\r\n\r\n",
        b"get e\r\n",
        b"set bin 3 0 8\r\na\r\nb\x00c\r\n\r\n",
        b"get bin\r\n",
        b"set f 4294967295 0 1\r\nx\r\n",
        b"get f\r\n",
        b"set " + MAX_KEY + b" 0 0 1\r\nm\r\n",
        b"get " + MAX_KEY + b"\r\n",
        b"set  spaced   0  0  2\r\nsp\r\n",
        b"get   spaced  \r\n",
        b"set lf 0 0 2\nlf\r\nget lf\n",
        b"set lz 007 0 005\r\nhello\r\n",
        b"get lz\r\n",
        b"set lz 0 0 00\r\n\r\nget lz\r\n",
        # -- malformed storage commands
        b"set f -1 0 1\r\nx\r\n",
        b"set f abc 0 1\r\nx\r\n",
        b"set f 0 abc 1\r\nx\r\n",
        b"set f 0 0 abc\r\nx\r\n",
        b"set f 0 0 -1\r\nx\r\n",
        b"set f 0 0\r\n",
        b"set f 0 0 1 noreply extra\r\nx\r\n",
        b"set f 0 0 1 junk\r\nx\r\n",
        b"set " + LONG_KEY + b" 0 0 1\r\nx\r\n",
        b"set chunk 0 0 3\r\nabcd\r\n",
        b"set chunk 0 0 3\r\nab\r\n\r\n",
        b"get chunk\r\n",
        b"set big 0 0 2000000\r\n" + b"b" * 2000000 + b"\r\n",
        b"set big 0 0 1\r\nb\r\n",
        b"set big 0 0 1048576\r\n" + b"b" * 1048576 + b"\r\n",
        b"get big\r\n",
        b"set fits 0 0 1000000\r\n" + b"f" * 1000000 + b"\r\n",
        b"get fits\r\n",
        # -- noreply, including errors it silences
        b"set nr 0 0 1 noreply\r\nx\r\n",
        b"get nr\r\n",
        b"add nr 0 0 1 noreply\r\ny\r\n",
        b"set nr 0 0 abc noreply\r\n",
        b"append nr 0 0 1 noreply\r\nz\r\nget nr\r\n",
        b"set nr 0 0 3 noreply\r\nabcd\r\n",
        # -- expiry rules
        b"set neg 0 -1 1\r\nx\r\n",
        b"get neg\r\n",
        b"set past 0 %d 1\r\nx\r\n" % long_past,
        b"get past\r\n",
        b"set future 0 %d 1\r\nx\r\n" % far_future,
        b"get future\r\n",
        b"set rel 0 100 1\r\nx\r\n",
        b"get rel\r\n",
        b"touch rel -1\r\n",
        b"get rel\r\n",
        # -- cas
        b"set c 0 0 1\r\na\r\n",
        lambda ctx: b"cas c 0 0 1 %d\r\nb\r\n" % ctx["cas:c"],
        lambda ctx: b"cas c 0 0 1 %d\r\nb\r\n" % (ctx["cas:c"] + 1000),
        b"cas nothere 0 0 1 1\r\nb\r\n",
        b"cas c 0 0 1 abc\r\nb\r\n",
        b"cas c 0 0 1\r\n",
        lambda ctx: b"cas c 0 0 1 %d noreply\r\nq\r\nget c\r\n" % ctx["cas:c"],
        # -- incr / decr
        b"set n 0 0 2\r\n10\r\n",
        b"incr n 5\r\n",
        b"decr n 100\r\n",
        b"get n\r\n",
        b"set n 0 0 3\r\n100\r\n",
        b"decr n 91\r\n",
        b"get n\r\n",
        b"incr n 1\r\n",
        b"set max 0 0 20\r\n18446744073709551615\r\n",
        b"incr max 1\r\n",
        b"get max\r\n",
        b"incr max 18446744073709551615\r\n",
        b"incr max 18446744073709551616\r\n",
        b"incr k1 1\r\n",
        b"incr nothere 1\r\n",
        b"decr nothere 1\r\n",
        b"incr n abc\r\n",
        b"incr n -1\r\n",
        b"incr n\r\n",
        b"incr n 1 noreply\r\nget n\r\n",
        b"set sp 0 0 3\r\n  5\r\n",
        b"incr sp 1\r\n",
        b"set neg 0 0 2\r\n-1\r\n",
        b"incr neg 1\r\n",
        b"set empty 0 0 0\r\n\r\n",
        b"incr empty 1\r\n",
        b"incr " + LONG_KEY + b" 1\r\n",
        # -- touch, gat, gats
        b"touch k1 100\r\n",
        b"touch nothere 100\r\n",
        b"touch k1 abc\r\n",
        b"touch k1 100 noreply\r\n",
        b"touch k1\r\n",
        b"gat 100 k1 k2 nothere\r\n",
        b"gat abc k1\r\n",
        b"gat 10\r\n",
        b"gat\r\n",
        b"gats 100 k1\r\n",
        # -- get edge cases
        b"get " + LONG_KEY + b"\r\n",
        b"get k1 " + LONG_KEY + b"\r\n",
        b"get\r\n",
        b"gets\r\n",
        # -- delete
        b"delete k1\r\n",
        b"delete k1\r\n",
        b"set d 0 0 1\r\nx\r\n",
        b"delete d 0\r\n",
        b"set d 0 0 1\r\nx\r\n",
        b"delete d 0 noreply\r\n",
        b"delete d noreply\r\n",
        b"delete d 5\r\n",
        b"delete d 0 0\r\n",
        b"delete\r\n",
        b"delete a b c d\r\n",
        b"delete " + LONG_KEY + b"\r\n",
        # -- verbosity, unknown commands, shutdown
        b"verbosity 1\r\n",
        b"verbosity\r\n",
        b"verbosity abc\r\n",
        b"verbosity 1 noreply\r\n",
        b"foo\r\n",
        b"\r\n",
        b"g\r\n",
        b"GET k2\r\n",
        b"shutdown\r\n",
        # -- TLS certificates reloaded on a server without TLS
        b"refresh_certs\r\n",
        b"refresh_certs noreply\r\n",
        # -- pipelining: many commands in one write
        b"set p1 0 0 1\r\na\r\nset p2 0 0 1\r\nb\r\nget p1 p2\r\ndelete p1\r\nget p1 p2\r\n",
        # -- flush_all
        b"set fl 0 0 1\r\nx\r\n",
        b"flush_all 10\r\n",
        b"get fl\r\n",
        b"flush_all abc\r\n",
        b"flush_all 0 noreply\r\n",
        b"get fl\r\n",
        b"set fl 0 0 1\r\nx\r\n",
        b"flush_all\r\n",
        b"get fl\r\n",
        b"flush_all noreply\r\n",
        b"flush_all 1 2 3\r\n",
    ]


def _exchange(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload + SENTINEL)
    data = b""
    while not VERSION_LINE.search(data):
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            raise AssertionError(f"no reply to {payload[:60]!r}; got {data[:200]!r}") from None
        if not chunk:
            raise AssertionError(f"connection closed after {payload[:60]!r}; got {data[:200]!r}")
        data += chunk
    return VERSION_LINE.sub(b"", data)


def _run_script(
    server: RunningServer, tls: ssl.SSLContext | None = None
) -> list[tuple[bytes, bytes]]:
    ctx: dict[str, int] = {}
    results: list[tuple[bytes, bytes]] = []
    raw = socket.create_connection(server.address, timeout=10)
    with tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw as sock:
        for step in _script():
            if callable(step):
                cas_reply = _exchange(sock, b"gets c\r\n")
                ctx["cas:c"] = int(cas_reply.split(b"\r\n")[0].split()[-1])
                payload = step(ctx)
            else:
                payload = step
            if tls and len(payload) > TLS_RECORD:
                sock.sendall(payload)
                first = recv_until(sock, b"\r\n", timeout=10)
                results.append((payload, first + _exchange(sock, b"")))
                continue
            results.append((payload, _exchange(sock, payload)))
    return results


def _normalize(reply: bytes) -> bytes:
    # CAS uniques are each server's own counter: compare their presence, not their value.
    return re.sub(rb"^(VALUE \S+ \d+ \d+) \d+\r$", rb"\1 <cas>\r", reply, flags=re.M)


@pytest.fixture(scope="module", params=["compiled", "python", "tls", "tls-python"])
def both(request, tmp_path_factory) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """memcached's replies and cacheserver's, with its compiled fast path and without, over
    TCP and over TLS (memcached -Z; cacheserver's TLS connections run the requests the
    compiled path knows through its request code)."""
    tls = request.param.startswith("tls")
    args = ["-I", "1m"]
    client = None
    if tls:
        certs = make_certificates(tmp_path_factory.mktemp("certs"))
        args += tls_args(certs)
        client = client_context(certs.ca)
    mc = start_memcached(*args, udp=not tls)
    python_only = ["--python-only"] if request.param.endswith("python") else []
    cs = start_cacheserver(*args, *python_only, udp=not tls)
    try:
        return _run_script(mc, client), _run_script(cs, client)
    finally:
        mc.stop()
        cs.stop()


def test_every_reply_is_byte_equal_to_memcached(both) -> None:
    expected, actual = both
    assert len(expected) == len(actual)
    mismatches = [
        f"request {req[:80]!r}\n  memcached:   {exp[:200]!r}\n  cacheserver: {got[:200]!r}"
        for (req, exp), (_, got) in zip(expected, actual, strict=True)
        if _normalize(exp) != _normalize(got)
    ]
    assert not mismatches, "\n".join(mismatches)


def test_script_exercised_every_reply_kind(both) -> None:
    """Guard against a script that silently stopped covering what it claims to cover."""
    expected, _ = both
    replies = b"".join(reply for _, reply in expected)
    for line in (
        b"STORED",
        b"NOT_STORED",
        b"EXISTS",
        b"NOT_FOUND",
        b"DELETED",
        b"TOUCHED",
        b"CLIENT_ERROR bad data chunk",
        b"CLIENT_ERROR bad command line format",
        b"CLIENT_ERROR invalid exptime argument",
        b"CLIENT_ERROR invalid numeric delta argument",
        b"CLIENT_ERROR cannot increment or decrement non-numeric value",
        b"SERVER_ERROR object too large for cache",
        b"ERROR\r\n",
        b"OK\r\n",
    ):
        assert line in replies, line
