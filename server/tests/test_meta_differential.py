"""Differential test of the meta protocol: one scripted session, every command, flag, mode
and error line, sent to Debian's memcached 1.6.18 and to cacheserver (compiled path and
Python path), replies byte-equal except CAS values and times (test_differential.normalize).
Then the same commands over UDP, one datagram each."""

from __future__ import annotations

import pytest
from test_differential import Replies, Step, differential, mismatches, normalize
from test_udp import reassemble, udp_exchange

from servers import RunningServer, start_cacheserver, start_memcached

LONG_KEY = b"k" * 251
MAX_KEY = b"m" * 250
OPAQUE_32 = b"O" + b"1" * 31  # the longest opaque token memcached echoes
OPAQUE_33 = b"O" + b"1" * 32


def _meta_script() -> list[Step]:
    return [
        # -- mn, and commands memcached does not know
        b"mn\r\n",
        b"mn with words\r\n",
        b"mx k\r\n",
        b"mgg k\r\n",
        b"MG k\r\n",
        # -- mg: misses, the key and the opaque come back, q leaves the miss out
        b"mg\r\n",
        b"mg missing\r\n",
        b"mg missing v s f t c h l\r\n",
        b"mg missing k " + OPAQUE_32 + b" v\r\n",
        b"mg missing v k O1 q\r\n",
        # -- ms, then mg with every flag that returns something, in the client's order
        b"ms k 5\r\nhello\r\n",
        b"mg k\r\n",
        b"mg k v\r\n",
        b"mg k s v f t k O123 h l c\r\n",
        b"mg k c l h t f s k O9 v\r\n",
        b"mg k u h\r\n",
        b"ms k 5 T100 F33 c k O9\r\nworld\r\n",
        b"mg k s v f t k\r\n",
        b"mg k P L\r\n",  # proxy flags: accepted, ignored
        b"ms flags 1 F4294967295 T2592000\r\nx\r\n",
        b"mg flags f t v\r\n",
        b"ms empty 0\r\n\r\n",
        b"mg empty v s\r\n",
        b"ms bin 8 F3\r\na\r\nb\x00c\r\n\r\n",
        b"mg bin v f s\r\n",
        # -- me
        b"me k\r\n",
        b"me missing\r\n",
        b"me\r\n",
        b"me " + LONG_KEY + b"\r\n",
        # -- mg errors
        b"mg k E1\r\n",  # no E flag in 1.6.18
        b"mg k v v\r\n",
        b"mg k Tabc\r\n",
        b"mg k T\r\n",
        b"mg k N\r\n",
        b"mg k Rx\r\n",
        b"mg k Z\r\n",
        b"mg k \xff\r\n",
        b"mg k " + OPAQUE_33 + b"\r\n",
        b"mg missing " + OPAQUE_33 + b"\r\n",
        b"mg k a b c d e f g h i j k l m n o p q r\r\n",
        b"mg k s f t k l h v c O1 q u x y z A B C D E\r\n",
        b"mg " + LONG_KEY + b" v\r\n",
        b"mg " + MAX_KEY + b" v k\r\n",
        b"mg k\x00junk v\r\n",  # memcached's command line ends at a NUL
        # -- md
        b"md\r\n",
        b"md missing\r\n",
        b"md missing q\r\n",
        b"md missing q O1 k\r\n",
        b"md k q\r\n",
        b"mg k v\r\n",
        b"ms d 1\r\nx\r\n",
        b"md d O5 k\r\n",
        b"ms d 1\r\nx\r\n",
        b"md d C1\r\n",
        b"md d C0\r\n",
        lambda cas: b"md d C%d k\r\n" % cas(b"d"),
        b"md d Cabc\r\n",
        b"md d x\r\n",  # no x flag in 1.6.18
        b"md d E\r\n",
        b"md d v s t f h l k O1\r\n",
        b"md " + LONG_KEY + b"\r\n",
        b"md k " + OPAQUE_33 + b"\r\n",
        b"md k a b c d e f g h i j k l m n o p q r\r\n",
        # -- ms modes, CAS, and their errors
        b"ms\r\n",
        b"ms k\r\n",
        b"ms k 2 MZ\r\nab\r\n",
        b"ms k 2 MEE\r\nab\r\n",
        b"ms k 2 ME\r\nab\r\n",
        b"ms new 2 ME c\r\nab\r\n",
        b"ms new 2 MA\r\ncd\r\n",
        b"ms new 2 MP\r\n__\r\n",
        b"mg new v\r\n",
        b"ms new 2 MR c k\r\nxy\r\n",
        b"ms nope 2 MR c\r\nxy\r\n",
        b"ms nope 2 MA\r\nxy\r\n",
        b"ms nope 2 MP q\r\nxy\r\n",
        b"ms new 2 MS q\r\nzz\r\n",
        b"ms new 2 C1\r\nzz\r\n",
        b"ms new 2 C0\r\nzz\r\n",
        lambda cas: b"ms new 2 C%d c\r\nok\r\n" % cas(b"new"),
        lambda cas: b"ms new 2 MR C%d\r\nok\r\n" % cas(b"new"),
        lambda cas: b"ms new 2 MA C%d\r\nok\r\n" % cas(b"new"),
        b"ms new 2 MA C5\r\nab\r\n",
        b"ms new 2 MA C0\r\nab\r\n",
        b"ms new 2 ME C5\r\nab\r\n",
        b"ms nope 2 C1\r\nzz\r\n",
        b"ms nope 2 MA C5\r\nab\r\n",
        b"ms nope2 2 ME C5 c\r\nab\r\n",
        b"mg new v\r\n",
        b"ms k 2 Cabc\r\nzz\r\n",
        b"ms k 2 Fabc\r\nzz\r\n",
        b"ms k 2 Tabc Fabc\r\nzz\r\n",
        b"ms k 2 Mx " + OPAQUE_33 + b"\r\nzz\r\n",
        b"ms k 2 " + OPAQUE_33 + b"\r\nzz\r\n",
        b"ms k abc\r\nzz\r\n",
        b"ms k -1\r\nzz\r\n",
        b"ms k 2147483646\r\n",
        b"ms k 2 x\r\nzz\r\n",
        b"ms k 2 E5\r\nzz\r\n",  # no E flag in 1.6.18
        b"ms viv 2 N30 I\r\nzz\r\n",  # accepted, and without a CAS nothing to do
        b"mg viv t v\r\n",
        b"ms k 2 T1 T2\r\nzz\r\n",
        b"ms k 2\r\nzzz\r\n",
        b"ms k 2 q\r\nzzz\r\n",
        b"ms " + LONG_KEY + b" 2\r\nab\r\n",
        b"ms k 2 a b c d e f g h i j k l m n o p q\r\nab\r\n",
        b"ms big 2000000\r\n" + b"b" * 2000000 + b"\r\n",
        b"ms big 1048576 q\r\n" + b"b" * 1048576 + b"\r\n",
        b"ms fits 1000000 F5\r\n" + b"f" * 1000000 + b"\r\n",
        b"mg fits s f\r\n",
        b"me fits\r\n",
        b"ms fits 2000000 MA\r\n" + b"b" * 2000000 + b"\r\n",
        b"mg fits s\r\n",
        b"ms gone 1 T-1\r\nx\r\n",
        b"mg gone\r\n",
        b"ms never 1 T0\r\nx\r\n",
        b"mg never t\r\n",
        # -- ma
        b"ma\r\n",
        b"ma n\r\n",
        b"ma n q\r\n",
        b"ma n N0 J10\r\n",
        b"ma n v\r\n",
        b"ma n v D5 c t\r\n",
        b"ma n MD v D100\r\n",
        b"ma n M- v\r\n",
        b"ma n M+ v\r\n",
        b"ma n MI v\r\n",
        b"ma n MX v\r\n",
        b"ma n MXY v\r\n",
        b"ma n E1\r\n",
        b"ma n Dabc\r\n",
        b"ma n Jabc N0\r\n",
        b"ma n N0 J5 D-1\r\n",
        b"ma n v D18446744073709551615\r\n",
        b"ma k\r\n",
        b"ma n q v\r\n",
        b"mg n v\r\n",
        b"ma n C1 v\r\n",
        lambda cas: b"ma n C%d v c\r\n" % cas(b"n"),
        b"ma viv N0 J5 q v\r\n",
        b"ma miss q v\r\n",
        b"ma n v k O1\r\n",
        b"ma n " + OPAQUE_33 + b"\r\n",
        b"ma n a b c d e f g h i j k l m n o p q r\r\n",
        b"ma " + LONG_KEY + b"\r\n",
        b"set m 0 0 3\r\n999\r\n",
        b"ma m v\r\n",
        b"get m\r\n",
        b"set m 0 0 3\r\n998\r\n",
        b"ma m v t T100 t\r\n",
        b"mg m v t\r\n",
        b"set zero 0 0 0\r\n\r\n",
        b"ma zero\r\n",
        b"ma zero C1\r\n",
        b"set text 0 0 1\r\nx\r\n",
        b"ma text C1\r\n",
        b"ma text q\r\n",
        # -- stale-while-revalidate
        b"ms sw 3 T100\r\nold\r\n",
        b"md sw I T30\r\n",
        b"mg sw v c t\r\n",
        b"mg sw v c t\r\n",
        b"mg sw v\r\n",
        b"me sw\r\n",
        b"ms sw 3 C1 I\r\nnew\r\n",
        b"mg sw v\r\n",
        lambda cas: b"ms sw 3 C%d I\r\nnew\r\n" % (cas(b"sw") + 1000),
        b"mg sw v t\r\n",
        b"md sw I q\r\n",
        b"mg sw\r\n",
        b"mg sw\r\n",
        lambda cas: b"ms sw 5 C%d\r\nfresh\r\n" % cas(b"sw"),
        b"mg sw v\r\n",
        b"md sw I\r\n",
        b"mg sw\r\n",
        b"md sw I\r\n",
        b"mg sw\r\n",
        b"ms sw 3\r\nset\r\n",
        b"mg sw v\r\n",
        b"mg viv1 N30 s v t\r\n",
        b"mg viv1 N30 s v t\r\n",
        b"ms viv1 3\r\nabc\r\n",
        b"mg viv1 N30 v\r\n",
        b"mg viv2 N30 T60 t\r\n",
        b"mg viv3 T60 N30 t\r\n",
        b"mg viv4 N30 q\r\n",
        b"ms rc 3 T10\r\nabc\r\n",
        b"mg rc R30 v t\r\n",
        b"mg rc R30 v t\r\n",
        b"ms rc2 3 T100\r\nabc\r\n",
        b"mg rc2 R30 v\r\n",
        b"ms rc3 3\r\nabc\r\n",
        b"mg rc3 R30 v\r\n",
        b"mg rc3 T50 t\r\n",
        b"mg rc3 k " + OPAQUE_33 + b" T500\r\n",
        b"mg rc3 t\r\n",
        # -- base64 keys
        b"ms Zm9v 3 b\r\nfoo\r\n",
        b"mg Zm9v b v k\r\n",
        b"mg foo v k\r\n",
        b"get foo\r\n",
        b"me foo\r\n",
        b"me Zm9v b\r\n",
        b"me Zm9v\r\n",
        b"me !!!! b\r\n",
        b"mg Zm9v= b\r\n",
        b"mg !!!! b\r\n",
        b"mg Z!m9v b v\r\n",
        b"mg Zm9vYmFy b v k\r\n",
        b"mg YQ==YmFy b v k\r\n",
        b"mg Y=== b k\r\n",
        b"mg Y=Q= b k\r\n",
        b"md Zm9v b k q\r\n",
        b"md Zm9v b k\r\n",
        b"md !!!! b\r\n",
        b"ms Zm9v 3 b k c\r\nbar\r\n",
        b"ms !!!! 3 b\r\nbar\r\n",
        b"ma Zm9v b k\r\n",
        b"ma !!!! b\r\n",
        b"set num 0 0 2\r\n10\r\n",
        b"ma bnVt b k v\r\n",
        b"mg bnVt b k v\r\n",
        b"ms YQBi 2 b k\r\nxx\r\n",
        b"mg YQBi b k v\r\n",
        b"ms YWJj 1 b\r\nx\r\n",
        b"ms YWJj 1 b MA\r\ny\r\n",
        b"mg abc k v\r\n",
        # -- quiet mode: a pipelined batch closed by mn
        b"ms q1 1 q\r\n1\r\nms q2 1 q\r\n2\r\nms q1 1 q ME\r\n3\r\nmn\r\n",
        b"mg q1 v q k\r\nmg q9 v q k\r\nmg q2 v q k O7\r\nmn\r\n",
        b"md q1 q\r\nmd q9 q O1\r\nma q2 q\r\nma q9 q\r\nmn\r\n",
        b"mg q1 q v\r\nmg q2 q v s\r\nmn\r\n",
    ]


@pytest.fixture(scope="module", params=["compiled", "python"])
def meta(request) -> tuple[Replies, Replies]:
    return differential(_meta_script(), "-I", "1m", python_only=request.param == "python")


def test_every_meta_reply_is_byte_equal_to_memcached(meta) -> None:
    expected, actual = meta
    differences = mismatches(expected, actual)
    assert not differences, differences


def test_meta_script_exercised_every_reply_kind(meta) -> None:
    """Guard against a script that silently stopped covering what it claims to cover."""
    expected, _ = meta
    replies = b"".join(normalize(reply) for _, reply in expected)
    for line in (
        b"HD\r\n",
        b"VA 5 ",
        b"EN\r\n",
        b"NF\r\n",
        b"NS\r\n",
        b"EX\r\n",
        b"MN\r\n",
        b"ME k exp=",
        b" X W\r\n",
        b" Z X\r\n",
        b" W\r\n",
        b" kZm9v b",
        b"CLIENT_ERROR bad command line format\r\n",
        b"CLIENT_ERROR bad data chunk\r\n",
        b"CLIENT_ERROR bad token in command line format\r\n",
        b"CLIENT_ERROR duplicate flag\r\n",
        b"CLIENT_ERROR invalid flag\r\n",
        b"CLIENT_ERROR invalid or duplicate flag\r\n",
        b"CLIENT_ERROR error decoding key\r\n",
        b"CLIENT_ERROR incorrect length for M token\r\n",
        b"CLIENT_ERROR invalid mode for ms M token\r\n",
        b"CLIENT_ERROR invalid mode for ma M token\r\n",
        b"CLIENT_ERROR opaque token too long\r\n",
        b"CLIENT_ERROR options flags are too long\r\n",
        b"CLIENT_ERROR options flags too long\r\n",
        b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
        b"SERVER_ERROR object too large for cache\r\n",
        b"ERROR\r\n",
    ):
        assert line in replies, line


# -- over UDP: each request in a datagram of its own, in this order --------------------------

UDP_STEPS = [
    b"ms u1 3\r\nabc\r\n",
    b"mg u1 v k s f t c\r\n",
    b"mg u1 v q\r\n",
    b"md u1 I\r\n",
    b"mg u1 v\r\n",
    b"mg u1 v\r\n",
    b"ma un N0 J5 v\r\n",
    b"ma un v D10\r\n",
    b"me un\r\n",
    b"mn\r\n",
    b"ms u2 3000\r\n" + b"x" * 3000 + b"\r\n",
    b"mg u2 v\r\n",  # a reply over three datagrams
    b"mg u9 v k O1\r\n",
    b"md u2\r\n",
    b"ms u3 2 Mx\r\nab\r\n",
]


@pytest.fixture(scope="module", params=["compiled", "python"])
def udp_pair(request):
    memcached = start_memcached("-I", "1m")
    python_only = ["--python-only"] if request.param == "python" else []
    server = start_cacheserver("-I", "1m", *python_only)
    yield memcached, server
    memcached.stop()
    server.stop()


def _udp_replies(server: RunningServer) -> list[bytes]:
    return [normalize(reassemble(udp_exchange(server, payload))) for payload in UDP_STEPS]


def test_meta_over_udp_is_answered_as_memcached_answers(udp_pair) -> None:
    memcached, server = udp_pair
    assert _udp_replies(server) == _udp_replies(memcached)
