"""Property test: random and mutated request bytes (text and meta protocol) over a real
connection.

Whatever arrives, the server stays up, every byte it sends back is a well-formed reply (or it
closes the connection cleanly), and data stored before the fuzzing is still intact.
"""

from __future__ import annotations

import re
import socket

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from servers import RunningServer, recv_until, request, start_cacheserver

SENTINELS = {b"sentinel:%d" % i: b"precious-%d-" % i * (i + 1) for i in range(20)}

CORPUS = [
    b"get fz1\r\n",
    b"gets fz1 fz2 fz3\r\n",
    b"gat 10 fz1\r\n",
    b"set fz1 0 0 5\r\nhello\r\n",
    b"add fz2 3 100 2\r\nab\r\n",
    b"replace fz1 0 0 1 noreply\r\nx\r\n",
    b"append fz1 0 0 3\r\nabc\r\n",
    b"prepend fz3 0 0 1\r\nz\r\n",
    b"cas fz1 0 0 1 12\r\nq\r\n",
    b"incr fz4 1\r\n",
    b"decr fz4 18446744073709551615\r\n",
    b"delete fz2\r\n",
    b"touch fz1 -1\r\n",
    b"verbosity 1\r\n",
    b"stats\r\n",
    b"stats items\r\n",
    b"version\r\n",
    b"set fz5 0 0 20000\r\n" + b"v" * 20000 + b"\r\n",
    # The meta protocol: every command, most flags, base64 keys, quiet batches.
    b"mg fz1 v k s f t c h l O123\r\n",
    b"mg fz1 R30 N30 T10 v q u\r\n",
    b"ms fz1 5 T100 F3 c k O9\r\nhello\r\n",
    b"ms fz2 2 ME q\r\nab\r\nms fz2 2 MA C1\r\ncd\r\nmn\r\n",
    b"ms fz3 3 MP I C7 b\r\nabc\r\n",
    b"md fz1 I T30 q O1 k\r\n",
    b"md fz2 C5 k\r\n",
    b"ma fz4 N0 J10 D3 MD v c t k\r\n",
    b"ma fz4 q\r\nmn\r\n",
    b"me fz1\r\n",
    b"mg Zm9v b v k\r\nme Zm9v b\r\n",
    b"mn\r\n",
]

SIMPLE_LINE = re.compile(
    rb"^(STORED|NOT_STORED|EXISTS|NOT_FOUND|DELETED|TOUCHED|END|OK|RESET|ERROR|\d+"
    rb"|VERSION \S+|STAT \S+ [^\r\n]*|ERROR: shutdown not enabled"
    rb"|CLIENT_ERROR [^\r\n]+|SERVER_ERROR [^\r\n]+"
    rb"|(HD|EN|NF|NS|EX)( [^ \n]+)*|MN"
    rb"|ME \S+ exp=-?\d+ la=\d+ cas=\d+ fetch=(yes|no) cls=\d+ size=\d+)$"
)
# A data block follows: its length is the third group of a VALUE line, the first of a VA line.
VALUE_LINE = re.compile(rb"^VALUE (\S+) (\d+) (\d+)( \d+)?$")
# A meta reply echoes the request's k and O tokens as sent: memcached splits a request on
# spaces alone, so they may hold a tab or a CR (only a space or the line's end stops one).
META_VALUE_LINE = re.compile(rb"^VA (\d+)( [^ \n]+)*$")


def assert_well_formed(stream: bytes) -> None:
    """Every reply is a known line, or a VALUE line followed by exactly its data block."""
    pos = 0
    while pos < len(stream):
        eol = stream.find(b"\r\n", pos)
        assert eol >= 0, f"unterminated reply at {pos}: {stream[pos : pos + 80]!r}"
        line = stream[pos:eol]
        pos = eol + 2
        value = VALUE_LINE.match(line)
        meta = META_VALUE_LINE.match(line)
        if value or meta:
            nbytes = int(value.group(3)) if value else int(meta.group(1))
            assert stream[pos + nbytes : pos + nbytes + 2] == b"\r\n", "data block length"
            pos += nbytes + 2
        else:
            assert SIMPLE_LINE.match(line), f"not a memcached reply line: {line[:120]!r}"


def mutate(data: bytes, draw) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        if not buf:
            break
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "dup"]))
        i = draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] = draw(st.integers(0, 255))
        elif op == "insert":
            buf[i:i] = draw(st.sampled_from([b" ", b"\r\n", b"\n", b"\x00", b"noreply", b"-1"]))
        elif op == "delete":
            del buf[i]
        elif op == "truncate":
            del buf[i:]
        else:
            buf[i:i] = buf[i : i + draw(st.integers(1, 16))]
    return bytes(buf)


@st.composite
def fuzz_input(draw) -> bytes:
    pieces = []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.booleans()):
            pieces.append(mutate(draw(st.sampled_from(CORPUS)), draw))
        else:
            pieces.append(draw(st.binary(max_size=300)))
    return b"".join(pieces)


@pytest.fixture(scope="module")
def fuzzed_server():
    server = start_cacheserver()
    for key, value in SENTINELS.items():
        assert request(server, b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value)) == (
            b"STORED\r\n"
        )
    yield server
    server.stop()


def send_and_drain(server: RunningServer, payload: bytes) -> bytes:
    with socket.create_connection(server.address, timeout=5) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # the server answers what it has, then closes
        except OSError:
            pass  # the server already closed (too long a line, HTTP, quit): allowed
        try:
            return recv_until(sock, b"\x00never\x00", timeout=5)
        except ConnectionResetError:
            return b""  # closed with unread request bytes pending: a clean close for a client


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payload=fuzz_input())
def test_garbage_never_kills_the_server_or_corrupts_data(
    fuzzed_server: RunningServer, payload: bytes
) -> None:
    # Commands that legitimately remove other data are not garbage: keep them out.
    assume(b"flush_all" not in payload and b"sentinel" not in payload)
    assume(b"shutdown" not in payload)
    reply = send_and_drain(fuzzed_server, payload)
    assert_well_formed(reply)
    assert fuzzed_server.proc.poll() is None, "server died"


def test_sentinels_survived_the_fuzzing(fuzzed_server: RunningServer) -> None:
    keys = list(SENTINELS)
    reply = request(fuzzed_server, b"get " + b" ".join(keys) + b"\r\n", b"END\r\n")
    expected = b"".join(b"VALUE %s 0 %d\r\n%s\r\n" % (k, len(v), v) for k, v in SENTINELS.items())
    assert reply == expected + b"END\r\n"
