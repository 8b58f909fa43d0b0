"""Protocol framing without sockets: pipelining, values split over many reads, long lines."""

from __future__ import annotations

from cacheserver.metrics.counters import Counters
from cacheserver.protocol.commands import Commands
from cacheserver.protocol.session import MAX_LINE, TextSession
from cacheserver.storage import Store


def new_session() -> TextSession:
    return TextSession(Commands(Store(capacity=64 << 20), Counters(), "test"))


def test_value_arriving_over_many_reads_is_stored_exactly() -> None:
    session = new_session()
    value = bytes(range(256)) * 2000  # 512,000 bytes including CR and LF bytes
    request = b"set big 5 0 %d\r\n%s\r\nget big\r\n" % (len(value), value)
    replies = b"".join(session.feed(request[i : i + 1000]) for i in range(0, len(request), 1000))
    assert replies == b"STORED\r\nVALUE big 5 %d\r\n%s\r\nEND\r\n" % (len(value), value)


def test_one_byte_at_a_time() -> None:
    session = new_session()
    request = b"set a 0 0 3\r\nxyz\r\nget a\r\nincr a 1\r\n"
    replies = b"".join(session.feed(request[i : i + 1]) for i in range(len(request)))
    assert replies == (
        b"STORED\r\nVALUE a 0 3\r\nxyz\r\nEND\r\n"
        b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
    )


def test_pipelined_requests_are_answered_in_one_write() -> None:
    session = new_session()
    request = b"".join(b"set k%d 0 0 1\r\n%d\r\n" % (i, i % 10) for i in range(100))
    request += b"get " + b" ".join(b"k%d" % i for i in range(100)) + b"\r\n"
    reply = session.feed(request)
    assert reply.count(b"STORED\r\n") == 100
    assert reply.count(b"VALUE ") == 100 and reply.endswith(b"END\r\n")


def test_too_large_value_is_swallowed_without_buffering_it() -> None:
    session = new_session()
    size = 5 * 1024 * 1024
    assert session.feed(b"set huge 0 0 %d\r\n" % size) == b""
    chunk = b"z" * 65536
    for _ in range(size // len(chunk)):
        assert session.feed(chunk) == b""
        assert session._chunks == []  # swallowed, not kept
    assert (
        session.feed(b"\r\nget huge\r\n") == b"SERVER_ERROR object too large for cache\r\nEND\r\n"
    )


def test_endless_line_closes_but_a_long_multiget_does_not() -> None:
    session = new_session()
    session.feed(b"x" * (MAX_LINE + 1))
    assert session.closing
    multi = new_session()
    keys = b" ".join(b"key%04d" % i for i in range(1000))
    assert multi.feed(b"get " + keys[: len(keys) // 2]) == b""
    assert not multi.closing
    assert multi.feed(keys[len(keys) // 2 :] + b"\r\n") == b"END\r\n"


def test_quit_stops_processing_and_http_is_dropped() -> None:
    session = new_session()
    assert session.feed(b"version\r\nquit\r\nversion\r\n") == b"VERSION test\r\n"
    assert session.closing
    http = new_session()
    assert http.feed(b"GET / HTTP/1.1\r\n") == b""
    assert http.closing


def test_a_reply_limit_holds_requests_back_until_asked_to_go_on() -> None:
    commands = Commands(Store(capacity=64 << 20), Counters(), "test")
    limited = TextSession(commands, reply_limit=1000)
    assert limited.feed(b"set v 0 0 600\r\n" + b"x" * 600 + b"\r\n") == b"STORED\r\n"
    burst = b"get v\r\n" * 5 + b"incr n 1\r\nget v"  # ends with a partial line
    one = b"VALUE v 0 600\r\n" + b"x" * 600 + b"\r\nEND\r\n"
    replies = [limited.feed(burst)]
    assert replies[0] == one * 2 and limited.held  # two replies pass 1,000 bytes
    while limited.held:
        replies.append(limited.feed(b""))
    assert b"".join(replies) == one * 5 + b"NOT_FOUND\r\n"
    assert not limited.idle  # the partial "get v" is still waiting for its end of line
    assert limited.feed(b"\r\n") == one


def test_cache_memlimit_resizes_the_store_and_evicts_down_to_it() -> None:
    store = Store(capacity=64 << 20)
    told: list[int] = []
    commands = Commands(store, Counters(), "test", on_memlimit=told.append)
    session = TextSession(commands)
    assert session.feed(b"cache_memlimit 16\r\n") == b"OK\r\n"
    assert told == [16 << 20]
    # Without a listener, the store itself is resized: a smaller size evicts at once.
    session = new_session()
    value = b"v" * 100_000
    for i in range(100):
        session.feed(b"set k%d 0 0 %d\r\n%s\r\n" % (i, len(value), value))
    store = session._commands.store
    assert store.curr_items == 100
    assert session.feed(b"cache_memlimit 8 noreply\r\n") == b""
    assert store.capacity == 8 << 20
    assert store.bytes_used <= store.capacity and store.curr_items < 100


def test_stats_detail_counts_every_path_of_get_and_set() -> None:
    session = new_session()
    session.feed(b"stats detail on\r\n")
    session.feed(b"set a:1 0 0 1\r\nx\r\nset a:2 0 0 1 noreply\r\ny\r\nadd a:3 0 0 1\r\nz\r\n")
    session.feed(b"get a:1\r\nget a:1 a:9\r\ngets a:2\r\ndelete a:3\r\ndelete a:3\r\n")
    assert session.feed(b"stats detail dump\r\n") == (
        b"PREFIX a get 4 hit 3 set 3 del 2\r\nEND\r\n"
    )
