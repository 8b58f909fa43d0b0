"""Differential test: one scripted session sent to Debian's memcached and to cacheserver.

Each step is sent on its own, followed by ``version`` as a sentinel so the reply to the step
can be cut out exactly (noreply steps answer nothing). Replies must be byte-equal, except the
version string and what ``normalize`` masks: CAS values (each server counts its own) and
times (remaining TTLs, seconds since the last access), which depend on when the second ticks.
The meta protocol's session (test_meta_differential.py) runs on the same machinery.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from servers import RunningServer, recv_until, start_cacheserver, start_memcached
from tlscerts import client_context, make_certificates, tls_args


@dataclass(frozen=True)
class Alone:
    """A request sent on its own and read up to its last line (``END`` or an error), without
    the sentinel: memcached streams ``lru_crawler metadump`` from another thread and answers
    what follows it in the same write only after the client writes again. With ``settle``,
    first wait until memcached's LRU maintainer has moved new items out of its hot and warm
    segments (key dumps list the cold segment, this server lists every item)."""

    payload: bytes
    settle: bool = False
    replies: int = 1  # how many replies (each ending in END or an error line) to wait for


# A step is the bytes to send, or a function that makes them given ``cas(key)``: the CAS
# value the server being tested holds for a key (read with gets), or an ``Alone``.
Step = bytes | Callable[[Callable[[bytes], int]], bytes] | Alone
LAST_LINE = re.compile(rb"(?:^|\n)(?:END|ERROR[^\r\n]*|BADCLASS[^\r\n]*|CLIENT_ERROR[^\r\n]*)\r\n")
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
        lambda cas: b"cas c 0 0 1 %d\r\nb\r\n" % cas(b"c"),
        lambda cas: b"cas c 0 0 1 %d\r\nb\r\n" % (cas(b"c") + 1000),
        b"cas nothere 0 0 1 1\r\nb\r\n",
        b"cas c 0 0 1 abc\r\nb\r\n",
        b"cas c 0 0 1\r\n",
        lambda cas: b"cas c 0 0 1 %d noreply\r\nq\r\nget c\r\n" % cas(b"c"),
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


def exchange(sock: socket.socket, payload: bytes) -> bytes:
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


Replies = list[tuple[bytes, bytes]]


def run_script(
    server: RunningServer, script: list[Step], tls: ssl.SSLContext | None = None
) -> Replies:
    """Each step's request and the server's reply, over one connection (TLS with ``tls``)."""
    results: Replies = []
    raw = socket.create_connection(server.address, timeout=10)
    with tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw as sock:

        def cas(key: bytes) -> int:
            return int(exchange(sock, b"gets %s\r\n" % key).split(b"\r\n")[0].split()[-1])

        for step in script:
            if isinstance(step, Alone):
                if step.settle:
                    _settle(sock)
                results.append((step.payload, _alone(sock, step.payload, step.replies)))
                continue
            payload = step(cas) if callable(step) else step
            if tls and len(payload) > TLS_RECORD:
                # memcached -Z answers a request larger than a TLS record before it reads
                # the sentinel behind it: read the first line alone.
                sock.sendall(payload)
                first = recv_until(sock, b"\r\n", timeout=10)
                results.append((payload, first + exchange(sock, b"")))
                continue
            results.append((payload, exchange(sock, payload)))
    return results


def _alone(sock: socket.socket, payload: bytes, replies: int) -> bytes:
    sock.sendall(payload)
    data = b""
    while len(LAST_LINE.findall(data)) < replies or not data.endswith(b"\r\n"):
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise AssertionError(f"connection closed after {payload[:60]!r}; got {data[:200]!r}")
        data += chunk
    return data


def _settle(sock: socket.socket, timeout: float = 10.0) -> None:
    """Wait until no item is in a hot or warm LRU segment (memcached's `stats items`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = exchange(sock, b"stats items\r\n")
        moving = re.findall(rb":number_(?:hot|warm) (\d+)", stats)
        if not any(int(n) for n in moving):
            return
        time.sleep(0.1)
    raise AssertionError("memcached's LRU maintainer did not move the new items to cold")


_META_STATUS = re.compile(rb"^(HD|VA \d+|EN|NF|NS|EX)((?: \S+)*)\r$", re.M)
_META_TIMES = re.compile(rb" ([ctl])\d+")
_METADATA = re.compile(rb"\b(exp|la|cas)=(?!-1\b)-?\d+")


def normalize(reply: bytes) -> bytes:
    """Mask what legitimately differs: CAS values (each server counts its own) and times."""
    reply = re.sub(rb"^(VALUE \S+ \d+ \d+) \d+\r$", rb"\1 <cas>\r", reply, flags=re.M)
    # Meta replies: c<cas>, t<seconds left> (but not t-1: never expires), l<seconds idle>.
    reply = _META_STATUS.sub(
        lambda m: m.group(1) + _META_TIMES.sub(rb" \1<n>", m.group(2)) + b"\r", reply
    )
    # me and lru_crawler metadump: exp=, la=, cas= (but not exp=-1: never expires).
    reply = _METADATA.sub(rb"\1=<n>", reply)
    # stats cachedump: an item's expiry time.
    reply = re.sub(rb"^(ITEM \S+ \[\d+ b; )\d+ s\]", rb"\1<n> s]", reply, flags=re.M)
    # stats conns: socket numbers, ephemeral ports, seconds.
    reply = re.sub(rb"^STAT \d+:", b"STAT <fd>:", reply, flags=re.M)
    reply = re.sub(
        rb"^(STAT <fd>:(?:listen_)?addr \w+:[^:]+):\d+", rb"\1:<port>", reply, flags=re.M
    )
    return re.sub(rb"^(STAT <fd>:secs_since_last_cmd) \d+", rb"\1 <n>", reply, flags=re.M)


def differential(
    script: list[Step],
    *args: str,
    python_only: bool,
    udp: bool = True,
    tls: ssl.SSLContext | None = None,
) -> tuple[Replies, Replies]:
    """memcached's replies and cacheserver's to one script, both started with ``args`` (and
    spoken to over TLS with ``tls``)."""
    mc = start_memcached(*args, udp=udp)
    cs = start_cacheserver(*args, *(["--python-only"] if python_only else []), udp=udp)
    try:
        return run_script(mc, script, tls), run_script(cs, script, tls)
    finally:
        mc.stop()
        cs.stop()


def mismatches(expected: Replies, actual: Replies) -> str:
    """The steps whose replies differ (empty when none do), for an assertion message."""
    assert len(expected) == len(actual)
    return "\n".join(
        f"request {req[:80]!r}\n  memcached:   {exp[:300]!r}\n  cacheserver: {got[:300]!r}"
        for (req, exp), (_, got) in zip(expected, actual, strict=True)
        if normalize(exp) != normalize(got)
    )


@pytest.fixture(scope="module", params=["compiled", "python", "tls", "tls-python"])
def both(request, tmp_path_factory) -> tuple[Replies, Replies]:
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
    python_only = request.param.endswith("python")
    return differential(_script(), *args, python_only=python_only, udp=not tls, tls=client)


def test_every_reply_is_byte_equal_to_memcached(both) -> None:
    expected, actual = both
    differences = mismatches(expected, actual)
    assert not differences, differences


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


# -- the rest of the text protocol: key dumps, stats detail/sizes/conns, cache_memlimit, ... --


def _admin_script() -> list[Step]:
    big = b"v" * 300  # a second slab class
    return [
        # -- value lengths memcached refuses at once (it would wait for anything below)
        b"set huge 0 0 2147483646\r\n",
        b"set huge 0 0 2147483647\r\n",
        b"set huge 0 0 2147483646 noreply\r\n",
        b"set huge 0 0 -5\r\n",
        # -- stats detail: per-prefix counters, dumped in memcached's hash order
        b"stats detail\r\n",
        b"stats detail foo\r\n",
        b"stats detail dump\r\n",
        b"stats detail on\r\n",
        b"set user:1 0 0 1\r\nx\r\n",
        b"set user:2 0 0 1\r\nx\r\n",
        b"get user:1 user:3 nope\r\n",
        b"gets user:1\r\n",
        b"gat 100 user:1\r\n",
        b"delete user:2\r\n",
        b"set session:a 0 0 1 noreply\r\nx\r\n",
        b"get session:a\r\n",
        b"set ab:x 0 0 1\r\nx\r\n",
        b"get a:x\r\n",  # memcached counts "a" under the longer "ab" it met first
        b"mg user:1 v\r\nms user:9 1\r\nx\r\n",  # the meta commands are not counted
        b"stats detail dump\r\n",
        b"stats detail off\r\n",
        b"get user:1\r\n",
        b"stats detail dump\r\n",
        b"stats reset\r\n",
        b"stats detail dump\r\n",
        # -- stats sizes
        b"stats sizes\r\n",
        # -- key dumps: stats cachedump and lru_crawler metadump
        b"flush_all\r\n",
        b"set dump:a 0 0 1\r\na\r\n",
        b"set dump:b 5 100 300\r\n" + big + b"\r\n",
        b"set dump:c 0 1000 3\r\nccc\r\n",
        b"ms ZHVtcDpl 1 b\r\ne\r\n",
        b"set dump%20d 0 0 1\r\nd\r\n",
        # Fetched once: memcached marks it but leaves it where it is in its LRU; this server
        # moves it to the recent end, which for the newest item is where it already is.
        b"get dump%20d\r\n",
        Alone(b"stats cachedump 1 0\r\n", settle=True),
        Alone(b"stats cachedump 1 2\r\n"),
        Alone(b"stats cachedump 7 0\r\n"),
        Alone(b"stats cachedump 30 0\r\n"),
        b"stats cachedump\r\n",
        b"stats cachedump 1\r\n",
        b"stats cachedump x 1\r\n",
        b"stats cachedump 1 x\r\n",
        b"stats cachedump -1 1\r\n",
        b"stats cachedump 64 1\r\n",
        Alone(b"lru_crawler metadump all\r\n", settle=True),
        Alone(b"lru_crawler metadump 1\r\n"),
        Alone(b"lru_crawler metadump 7,1\r\n"),
        Alone(b"lru_crawler metadump 30\r\n"),
        Alone(b"lru_crawler metadump 100\r\n"),
        Alone(b"lru_crawler metadump 0\r\n"),
        Alone(b"lru_crawler metadump x\r\n"),
        Alone(b"lru_crawler metadump 1,x\r\n"),
        Alone(b"lru_crawler metadump\r\n"),
        # A metadump must not overtake replies still waiting (a get or mn sends them).
        Alone(b"delete nothere\r\nlru_crawler metadump all\r\n"),
        Alone(b"mn\r\nlru_crawler metadump all\r\n"),
        b"lru_crawler foo bar\r\n",
        b"lru_crawler\r\n",
        # -- cache_memlimit
        b"cache_memlimit\r\n",
        b"cache_memlimit abc\r\n",
        b"cache_memlimit 7\r\n",
        b"cache_memlimit 1000000001\r\n",
        b"cache_memlimit 100\r\n",
        b"cache_memlimit 100 noreply\r\n",
        b"cache_memlimit 5 noreply\r\n",
        b"cache_memlimit 1 2 3\r\n",
        # -- shutdown is off without -A
        b"shutdown\r\n",
        b"shutdown graceful\r\n",
        # -- stats conns (UDP is off here: memcached lists one UDP socket per thread)
        b"stats conns\r\n",
    ]


@pytest.fixture(scope="module", params=["compiled", "python"])
def admin(request) -> tuple[Replies, Replies]:
    python_only = request.param == "python"
    return differential(_admin_script(), "-I", "1m", python_only=python_only, udp=False)


def test_admin_replies_are_byte_equal_to_memcached(admin) -> None:
    expected, actual = admin
    differences = mismatches(expected, actual)
    assert not differences, differences


def test_admin_script_exercised_every_reply_kind(admin) -> None:
    expected, _ = admin
    replies = b"".join(normalize(reply) for _, reply in expected)
    for line in (
        b"PREFIX user get 4 hit 3 set 2 del 1\r\n",
        b"STAT sizes_status disabled\r\n",
        b"ITEM dump:c [3 b; <n> s]\r\n",
        b"key=dump%3Ab exp=<n> la=<n> cas=<n> fetch=no cls=7 size=369\n",
        b"key=dump%2520d exp=-1 la=<n> cas=<n> fetch=yes cls=1 size=",
        b"ERROR cannot pipeline other commands before metadump\r\n",
        b"BADCLASS invalid class id\r\n",
        b"CLIENT_ERROR Illegal slab id\r\n",
        b"CLIENT_ERROR usage: stats detail on|off|dump\r\n",
        b"MEMLIMIT_TOO_SMALL",
        b"MEMLIMIT_ADJUST_FAILED",
        b"STAT <fd>:state conn_listening\r\n",
        b"STAT <fd>:state conn_parse_cmd\r\n",
    ):
        assert line in replies, line


SWITCHED_OFF: list[Step] = [
    b"flush_all\r\n",
    b"flush_all 0\r\n",
    b"flush_all abc\r\n",
    b"flush_all noreply\r\n",
    b"flush_all 1 2 3\r\n",
    b"set k 0 0 1\r\nx\r\n",
    Alone(b"stats cachedump 1 0\r\n"),
    Alone(b"lru_crawler metadump all\r\n"),
    b"get k\r\n",
]


@pytest.mark.parametrize("python_only", [False, True], ids=["compiled", "python"])
def test_flush_all_and_key_dumps_switched_off_as_memcached(python_only: bool) -> None:
    """-F refuses flush_all, -X the key dumps."""
    expected, actual = differential(SWITCHED_OFF, "-F", "-X", python_only=python_only)
    differences = mismatches(expected, actual)
    assert not differences, differences
    assert expected[0][1] == b"CLIENT_ERROR flush_all not allowed\r\n"


@pytest.mark.parametrize("mode", [b"", b" graceful"], ids=["now", "graceful"])
def test_shutdown_with_a_stops_the_server_as_memcached(mode: bytes) -> None:
    """With -A, shutdown closes the connection without a reply and the server exits."""
    servers = [start_memcached("-A"), start_cacheserver("-A")]
    try:
        for server in servers:
            with socket.create_connection(server.address, timeout=10) as sock:
                reply = exchange(sock, b"shutdown please\r\n")
                assert reply == b"CLIENT_ERROR invalid shutdown mode\r\n", server.name
                sock.sendall(b"shutdown" + mode + b"\r\n")
                assert sock.recv(100) == b"", server.name
            assert server.proc.wait(timeout=15) == 0, server.name
    finally:
        for server in servers:
            server.stop()
