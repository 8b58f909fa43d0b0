"""The compiled fast path (cacheserver/fastpath) against the Python path it shortcuts.

The Python layers are the definition of the protocol; the compiled path must leave the same
replies, the same items in the same LRU order, the same memory accounting and the same
counters for any input, including input it only partly handles. Hypothesis drives both with
the same request streams (split at random points) and compares everything a user or a stats
reader could see; the socket tests then check the wiring against memcached itself.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cacheserver.discovery.membership import Membership, Node
from cacheserver.discovery.watch import ClusterConfig
from cacheserver.fastpath import make_engine
from cacheserver.metrics.counters import Counters
from cacheserver.metrics.latency import LatencyHistogram
from cacheserver.protocol.commands import Commands
from cacheserver.protocol.session import TextSession
from cacheserver.storage import Store
from cacheserver.storage.item import FETCHED, META_AT
from servers import RunningServer, recv_until, request, start_cacheserver, start_memcached

START = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class Side:
    """One store with its session; ``compiled`` runs what the fast path takes through it."""

    def __init__(self, clock: Clock, compiled: bool, capacity: int) -> None:
        self.store = Store(capacity, max_item_size=4096, clock=clock)
        self.counters = Counters()
        # As a TCP connection of an appliance: `get AmazonElastiCache:cluster` is discovery.
        discovery = ClusterConfig("unused", clock=clock)
        discovery.serve(Membership(3, (Node("a.h.ns.svc", "10.0.0.1", 11211),)))
        self.commands = Commands(self.store, self.counters, "test")
        self.session = TextSession(self.commands, discovery=discovery)
        self.engine = None
        if compiled:
            # `make test` builds the extension: a missing one is a broken install, not a skip.
            self.engine = make_engine(self.store, self.counters, LatencyHistogram(), self.commands)

    def feed(self, data: bytes) -> bytes:
        session = self.session
        if self.engine is None or not session.idle or session.closing:
            return session.feed(data)
        # What network/tcp.py does with the engine: its replies, then the session's.
        replies, done = self.engine.run(data)
        return replies + session.feed(data[done:]) if done < len(data) else replies

    def visible_state(self) -> tuple:
        store = self.store
        return (
            list(store.table.items()),  # items, byte for byte, in LRU order
            store.bytes_used,
            store.last_cas,
            store.stats,
            self.counters.as_dict(),
            self.commands.prefix_stats.dump(),  # stats detail: counted on both paths
        )


# The last key is one byte too long; the others are valid (VALID_KEYS of them). A get of
# AmazonElastiCache:cluster alone is auto discovery, which the compiled path leaves to Python.
KEYS = [b"a", b"b", b"c", b"d", b"e", b"key:0001", b"AmazonElastiCache:cluster", b"k" * 250]
KEYS += [b"k" * 251]
VALID_KEYS = len(KEYS) - 1
NUMBERS = [b"0", b"1", b"5", b"007", b"100", b"-1", b"4294967295", b"4294967296", b"x"]


# set twice: plain sets are most of real traffic and the fast path's other half.
KINDS = ["get", "multiget", "set", "set", "noreply", "gets", "incr", "delete", "touch", "flush"]
KINDS += ["junk", "blank", "config", "mg", "mg", "ms", "ms", "meta"]
MG_FLAGS = [b"v", b"k", b"s", b"f", b"t", b"c", b"h", b"l", b"q", b"u", b"O1", b"T5", b"N30"]
MG_FLAGS += [b"R30", b"b", b"x", b"T"]
MS_FLAGS = [b"T5", b"T-1", b"F3", b"q", b"c", b"k", b"MA", b"ME", b"MP", b"MR", b"I", b"C1", b"b"]
MS_FLAGS += [b"MS", b"Ms", b"M"]
META_OTHER = [b"mn", b"md %s q", b"md %s I T5", b"md %s C1", b"ma %s N0 J1 v", b"ma %s q", b"me %s"]
# stats detail on: the compiled path steps aside so that every key is counted.
META_OTHER += [b"stats detail on", b"stats detail off"]


@st.composite
def request_line(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(KINDS))
    key = draw(st.sampled_from(KEYS))
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    sep = draw(st.sampled_from([b" ", b" ", b"  "]))
    if kind == "get":
        return b"get" + sep + key + eol
    if kind == "multiget":
        keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=40))
        return b"get " + b" ".join(keys) + eol
    if kind in ("set", "noreply"):
        # Mostly small values; large ones fill the small stores so that sets evict.
        value = draw(
            st.one_of(st.binary(max_size=20), st.sampled_from([b"x" * 300, b"\r\n" * 200]))
        )
        size = len(value) if draw(st.integers(0, 9)) else len(value) + draw(st.integers(-2, 2))
        flags = draw(st.sampled_from([b"0", b"0", b"5", b"007", b"4294967295", b"4294967296"]))
        exptime = draw(
            st.sampled_from([b"0", b"0", b"0", b"2", b"-1", b"00", b"2592001", b"9" * 10])
        )
        tail = b" noreply" if kind == "noreply" else b""
        line = b"set" + sep + key + sep + flags + b" " + exptime + b" %d" % max(size, 0)
        return line + tail + eol + value + b"\r\n"
    if kind == "gets":
        keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=3))
        return b"gets " + b" ".join(keys) + eol
    if kind == "incr":
        return b"incr " + key + b" " + draw(st.sampled_from(NUMBERS)) + eol
    if kind == "delete":
        return b"delete " + key + eol
    if kind == "touch":
        return b"touch " + key + b" " + draw(st.sampled_from(NUMBERS)) + eol
    if kind == "flush":
        return b"flush_all" + draw(st.sampled_from([b"", b" 1"])) + eol
    if kind == "config":
        return b"config get cluster" + eol
    if kind == "mg":
        flags = draw(st.lists(st.sampled_from(MG_FLAGS), unique=True, max_size=6))
        return b" ".join((b"mg", key, *flags)) + eol
    if kind == "ms":
        value = draw(st.binary(max_size=20))
        size = len(value) if draw(st.integers(0, 9)) else len(value) + draw(st.integers(-2, 2))
        flags = draw(st.lists(st.sampled_from(MS_FLAGS), unique=True, max_size=4))
        line = b" ".join((b"ms", key, b"%d" % max(size, 0), *flags))
        return line + eol + value + b"\r\n"
    if kind == "meta":
        form = draw(st.sampled_from(META_OTHER))
        return (form % key if b"%s" in form else form) + eol
    if kind == "junk":
        return draw(st.binary(max_size=30)) + eol
    return eol


@st.composite
def request_stream(draw: st.DrawFn) -> tuple[list[bytes], list[int]]:
    """Requests cut into the reads a server would see, and clock steps between reads. The
    stream starts by storing the valid keys, so that gets find items to answer with. Reads
    end at many request boundaries (the compiled path starts afresh with each read and hands
    the rest of a read over at the first request it does not take) and at a few random
    points (partial requests)."""
    flags = draw(st.sampled_from([b"0", b"3", b"4294967295"]))
    warm = b"".join(
        b"set %s %s 0 2\r\nv%d\r\n" % (k, flags, i) for i, k in enumerate(KEYS[:VALID_KEYS])
    )
    lines = [warm, *draw(st.lists(request_line(), min_size=1, max_size=40))]
    data = b"".join(lines)
    ends = [sum(len(line) for line in lines[: i + 1]) for i in range(len(lines) - 1)]
    keep = draw(st.lists(st.booleans(), min_size=len(ends), max_size=len(ends)))
    cuts = {end for end, kept in zip(ends, keep, strict=True) if kept}
    cuts |= set(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    cuts = sorted(cuts)
    pieces = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    n = len(pieces)
    steps = draw(st.lists(st.sampled_from([0, 0, 1, 3, 61]), min_size=n, max_size=n))
    return [p for p in pieces if p], steps


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=request_stream(), capacity=st.sampled_from([1500, 6000, 1 << 20]))
def test_compiled_path_leaves_what_the_python_path_leaves(stream, capacity: int) -> None:
    # Small capacities make stores evict; the clock moves so items expire under the fast
    # path's lookups and hits move items again after the bump interval; flush_all with a
    # delay leaves a pending flush behind.
    pieces, steps = stream
    clock = Clock()
    python, compiled = Side(clock, False, capacity), Side(clock, True, capacity)
    for piece, step in zip(pieces, steps, strict=False):
        assert compiled.feed(piece) == python.feed(piece), piece
        clock.now += step
    assert compiled.visible_state() == python.visible_state()


def test_a_blank_line_after_a_request_is_an_error_on_both_paths() -> None:
    # The compiled path once took a blank line for the request before it (an extra MN).
    clock = Clock()
    python, compiled = Side(clock, False, 1 << 20), Side(clock, True, 1 << 20)
    for data in (b"mn\r\n\nmn\r\n", b"mn\r\n   \r\n", b"mg a v\r\n\n", b"get a\n\n"):
        assert compiled.feed(data) == python.feed(data), data
    assert compiled.feed(b"mn\n\n") == b"MN\r\nERROR\r\n"


def test_a_hit_marks_the_item_fetched_and_moves_it_to_the_lru_end() -> None:
    side = Side(Clock(), True, 1 << 20)
    assert side.feed(b"set a 0 0 1\r\n1\r\nset b 0 0 1\r\n2\r\n") == b"STORED\r\nSTORED\r\n"
    assert list(side.store.table) == [b"a", b"b"]
    assert side.feed(b"get a\r\n") == b"VALUE a 0 1\r\n1\r\nEND\r\n"
    assert list(side.store.table) == [b"b", b"a"]
    assert side.store.table[b"a"][META_AT] & FETCHED
    assert not side.store.table[b"b"][META_AT] & FETCHED
    assert side.counters.get_hits == 1 and side.counters.cmd_set == 2


# -- over sockets, compared with memcached ---------------------------------------------------

# Plain gets and sets (the fast path) interleaved with everything else (the Python path),
# so one read holds both and is handed over mid-way. (A bad data chunk is left out: pipelined,
# memcached 1.6.18 drops its CLIENT_ERROR line, which it sends when the request comes alone;
# the hypothesis test above covers that request on both paths.)
PIPELINE = b"".join(
    [
        b"set p1 0 0 5\r\nhello\r\n",
        b"get p1\r\n",
        b"incr p1 1\r\n",
        b"set n 3 0 2\r\n10\r\n",
        b"incr n 5\r\n",
        b"get n p1 nothere n\r\n",
        b"gets nothere\r\n",
        b"gets p1 n nothere\r\n",
        b"set big 0 0 3000\r\n" + b"z" * 3000 + b"\r\n",
        b"get big\r\n",
        b"set x 0 0 1 noreply\r\ny\r\n",
        b"get x\r\n",
        b"get " + b"k" * 251 + b"\r\n",
        b"delete n\r\n",
        b"get n\r\n",
        b"set lf 0 0 2\nlf\r\nget lf\n",
        b"bogus\r\n",
        b"set e 0 100 1\r\ne\r\nget e\r\n",
        b"get " + b" ".join(b"p1" for _ in range(40)) + b"\r\n",
    ]
)


def _normalize_cas(reply: bytes) -> bytes:
    # Each server counts its own CAS uniques: compare their presence, not their value.
    return re.sub(rb"^(VALUE \S+ \d+ \d+) \d+\r$", rb"\1 <cas>\r", reply, flags=re.M)


def _replies(server: RunningServer, payload: bytes, chunk: int) -> bytes:
    with socket.create_connection(server.address, timeout=10) as sock:
        for i in range(0, len(payload), chunk):
            sock.sendall(payload[i : i + chunk])
            time.sleep(0.001)  # let the server see each piece as its own read
        sock.sendall(b"version\r\n")
        reply = recv_until(sock, b"\r\n", timeout=10)
        while b"VERSION " not in reply:
            reply += recv_until(sock, b"\r\n", timeout=10)
    return _normalize_cas(reply[: reply.index(b"VERSION ")])


@pytest.fixture(scope="module")
def servers():
    memcached, compiled = start_memcached(), start_cacheserver()
    yield memcached, compiled
    memcached.stop()
    compiled.stop()


@pytest.mark.parametrize("chunk", [len(PIPELINE), 4096, 7])
def test_pipelined_mix_is_answered_as_memcached_answers(servers, chunk: int) -> None:
    memcached, compiled = servers
    for server in servers:
        request(server, b"flush_all\r\n")
    expected = _replies(memcached, PIPELINE, chunk)
    assert b"CLIENT_ERROR bad command line format" in expected and b"VALUE big" in expected
    assert _replies(compiled, PIPELINE, chunk) == expected


def _settings(server: RunningServer) -> dict[str, str]:
    reply = request(server, b"stats settings\r\n", b"END\r\n").decode()
    return {p[1]: p[2] for p in (line.split() for line in reply.splitlines()) if len(p) == 3}


def test_the_compiled_path_is_on_by_default_and_can_be_turned_off() -> None:
    default = start_cacheserver()
    python = start_cacheserver("--python-only")
    try:
        assert _settings(default)["fast_path"] == "compiled"
        assert _settings(python)["fast_path"] == "python"
        for server in (default, python):
            assert request(server, b"set a 0 0 1\r\n1\r\nget a\r\n", b"END\r\n") == (
                b"STORED\r\nVALUE a 0 1\r\n1\r\nEND\r\n"
            )
    finally:
        default.stop()
        python.stop()


@pytest.fixture(scope="module")
def python_only():
    server = start_cacheserver("--python-only")
    yield server
    server.stop()


@pytest.mark.parametrize(
    "payload",
    [
        b"set u1 0 0 2\r\nab\r\n",
        b"get u1\r\n",  # both on the fast path: sent with sendmmsg
        b"incr u1 1\r\n",  # the Python path
        b"set u3 0 0 3000\r\n" + b"v" * 3000 + b"\r\n",
        b"get u3\r\n",  # a reply over 3 datagrams: the Python path frames it
    ],
)
def test_udp_datagrams_are_answered_as_memcached_answers(servers, payload: bytes) -> None:
    from test_udp import reassemble, udp_exchange

    memcached, compiled = servers
    assert reassemble(udp_exchange(compiled, payload)) == reassemble(
        udp_exchange(memcached, payload)
    )


@pytest.mark.parametrize(
    "payload",
    [
        b"set m1 0 0 1\r\n5\r\nincr m1 3\r\nget m1\r\n",  # handed over mid-datagram
        b"get m1\r\nget m1",  # a request cut off at the datagram's end is dropped with it
        b"get m1\r\nstats\r\nget m1\r\n",  # refused over UDP after a fast-path reply
    ],
)
def test_udp_datagram_with_several_requests_as_the_python_path(
    servers, python_only, payload: bytes
) -> None:
    # memcached answers each request of such a datagram in its own reply datagrams; both
    # paths here answer them together, the same way.
    from test_udp import reassemble, udp_exchange

    compiled = servers[1]
    assert reassemble(udp_exchange(compiled, payload)) == reassemble(
        udp_exchange(python_only, payload)
    )


def test_the_compiled_path_answers_mg_ms_and_mn_itself() -> None:
    """The meta requests a meta-only client sends most (mg, ms in set mode, a quiet batch
    closed by mn) run in C, with the Python path's replies."""
    clock = Clock()
    python, compiled = Side(clock, False, 1 << 20), Side(clock, True, 1 << 20)
    data = b"".join(
        [
            b"ms k 2 T5 F3 c k O1\r\nab\r\n",
            b"ms q 1 q\r\nx\r\n",
            b"mg k v s f t c h l k O2\r\n",
            b"mg k v q\r\nmg nope v q k\r\nmg nope k O3\r\nmn\r\n",
            b"mg k u h\r\n",
            b"ms d 2 c F0 T0 MS\r\nab\r\n",  # Ruby's Dalli names the set mode
        ]
    )
    assert compiled.engine is not None
    replies, done = compiled.engine.run(data)
    assert done == len(data)
    assert replies == python.feed(data)
    assert replies.startswith(b"HD c1 kk O1\r\nVA 2 s2 f3 t5 c1 h0 l0 kk O2\r\nab\r\n")
    assert replies.endswith(b"HD c3\r\n")
    assert compiled.visible_state() == python.visible_state()
    # What the compiled path leaves to Python: errors, base64 keys, TTL changes, other modes,
    # and items with meta marks (a stale one here).
    compiled.feed(b"md k I\r\n")
    leftovers = [b"mg k v v\r\n", b"mg k2 T10\r\n", b"mg Zm9v b\r\n", b"ms k 1 MA\r\nx\r\n"]
    leftovers += [b"ms k 1 Ms\r\nx\r\n", b"ms k 1 MS MS\r\nx\r\n"]
    for leftover in [*leftovers, b"mg k v\r\n"]:
        assert compiled.engine.run(leftover) == (b"", 0), leftover


# -- the boundary (fastpath/boundary.py) -----------------------------------------------------


def _in_fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a new interpreter: the extension reads its constants once, at import."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_compiled_path_takes_its_limits_from_the_python_modules() -> None:
    # A shorter key limit in protocol/commands.py is what the C code then applies, without a
    # rebuild: the 11-byte key goes to the Python path, the 10-byte one does not.
    done = _in_fresh_python(
        """
        from cacheserver.protocol import commands
        commands.KEY_MAX_LENGTH = 10
        from cacheserver.fastpath import make_engine
        from cacheserver.metrics.counters import Counters
        from cacheserver.metrics.latency import LatencyHistogram
        from cacheserver.storage import Store
        engine = make_engine(Store(1 << 20), Counters(), LatencyHistogram())
        for key in (b"k" * 10, b"k" * 11):
            print(engine.run(b"get " + key + b"\\r\\n"))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["(b'END\\r\\n',", "16)", "(b'',", "0)"]


def test_python_that_reads_items_another_way_than_the_store_core_refuses_to_load() -> None:
    # The item layout is the store core's (storage/core.h); item.py reads headers with a
    # struct format that must put every field where the core does.
    done = _in_fresh_python(
        """
        from cacheserver.storage import item
        item.check_layout("<QQIIBB")  # a 64-bit exptime: the core writes 32 bits
        """
    )
    assert done.returncode != 0
    assert "does not match the store core's layout (storage/core.h)" in done.stderr


def test_the_engine_looks_up_what_it_uses_when_it_is_made() -> None:
    # What is missing on the Python side stops the server when the engine is made, not at the
    # first request: a store that is not the store core, counters without a field it adds to.
    with pytest.raises(TypeError, match=r"cacheserver\.storage\.Store"):
        make_engine(object(), Counters(), LatencyHistogram())  # type: ignore[arg-type]
    with pytest.raises(AttributeError, match="cmd_get"):
        make_engine(Store(1 << 20), object(), LatencyHistogram())  # type: ignore[arg-type]
