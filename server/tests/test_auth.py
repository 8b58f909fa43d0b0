"""memcached's -Y text-protocol authentication and -F, against Debian's memcached 1.6.18.

Both servers get the same credentials file and the same conversations, one write at a time;
every reply must be byte-equal. One write carries one unauthenticated request: memcached
answers only the last of several that arrive in one read (each reply overwrites the one
before, see docs/architecture.md), which is no behaviour to copy, so the scripts never ask
for it; ``test_each_unauthenticated_request_is_answered`` shows what this server does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import uvloop

from cacheserver.fastpath import make_engine
from cacheserver.metrics.counters import Counters
from cacheserver.metrics.latency import LatencyHistogram
from cacheserver.network.tcp import TCPServer
from cacheserver.protocol.commands import Commands
from cacheserver.security.credentials import CredentialsFile
from cacheserver.storage import Store
from servers import (
    RunningServer,
    free_port,
    recv_until,
    run_to_exit,
    start_cacheserver,
    start_memcached,
    stats,
)

CREDENTIALS = b"alice:secret\nbob:pw:with:colons\r\ncarol:\n"
LOGIN = b"set auth 0 0 12\r\nalice secret\r\n"
QUIET = 0.3  # seconds without a byte: the server has nothing (more) to say

# Conversations: each a list of writes on one new connection. A write that should bring no
# reply (a request still incomplete) is marked with None after it.
Step = bytes | tuple[bytes, None]
CONVERSATIONS: dict[str, list[Step]] = {
    "refused before authenticating": [
        b"get foo\r\n",
        b"version\r\n",
        b"stats\r\n",
        b"flush_all\r\n",
        b"quit\r\n",
        b"\r\n",
        b"SET a 0 0 12\r\n",
        b"set a 0 0\r\n",
        b"set a 0 0 -1\r\n",
        b"set a 0 0 5x\r\n",
        b"set a 0 0 0x5\r\n",
        b"get a b c d\r\n",
        b"set a 0 0 99999999999999999999999\r\n",
    ],
    "malformed and wrong credentials": [
        b"set a 0 0 5\r\nalice\r\n",
        b"set a 0 0 0\r\n\r\n",
        b"set a 0 0 3\r\nabcde",
        b"set a 0 0 12\r\nalice wrongg\r\n",
        b"set a 0 0 13\r\nalice secretX\r\n",
        b"set a 0 0 12\r\nALICE secret\r\n",
        b"set a 0 0 6\r\nalice \r\n",
        b"set a 0 0 10\r\nbob pw:wit\r\n",
        b"get k\r\n",
        # finally in, with key, flags, exptime and noreply all ignored
        b"set whatever 123 456 12 noreply\r\nalice secret\r\n",
        b"set k 0 0 2\r\nhi\r\n",
        b"get k\r\n",
        b"delete k\r\n",
    ],
    "in with pipelined requests": [
        LOGIN + b"set k 0 0 2\r\nhi\r\nget k\r\ndelete k\r\nget k\r\n",
    ],
    "split over writes": [
        (b"set a 0 0 1", None),
        (b"2\r\nalice sec", None),
        b"ret\r\n",
        b"get nothing\r\n",
    ],
    "a password with colons": [
        b"set a 0 0 18\r\nbob pw:with:colons\r\n",
        b"get k\r\n",
    ],
    "extra tokens and spaces": [
        b"set a 0 0 20\r\nalice  secret  extra\r\n",
        b"get k\r\n",
    ],
    "tokens in an odd shape": [
        b" set  a 0 0 +12 \r\nalice secret\r\n",
        b"get k\r\n",
    ],
    "newline only": [
        b"set a 0 0 12\nalice secret\r\n",
        b"get k\r\n",
    ],
}


def converse(server: RunningServer, steps: list[Step]) -> list[bytes]:
    """What the server answers to each write (b"" for none; <closed> when it hangs up)."""
    replies = []
    with socket.create_connection(server.address, timeout=5) as sock:
        for step in steps:
            payload, expect = (step[0], False) if isinstance(step, tuple) else (step, True)
            sock.sendall(payload)
            replies.append(read_quiet(sock, expect))
    return replies


def read_quiet(sock: socket.socket, expect: bool) -> bytes:
    """Read until a reply ends with CRLF and nothing follows for a moment."""
    data = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        sock.settimeout(0.05 if data.endswith(b"\r\n") else (2.0 if expect else QUIET))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if data.endswith(b"\r\n") or not expect:
                return data
            continue
        if not chunk:
            return data + b"<closed>"
        data += chunk
    return data


@pytest.fixture(scope="module")
def credentials(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "credentials"
    path.write_bytes(CREDENTIALS)
    return path


@pytest.fixture(scope="module", params=["compiled", "python"])
def pair(request, credentials: Path):
    """memcached -Y and cacheserver -Y (with and without its compiled fast path)."""
    mc = start_memcached("-Y", str(credentials), udp=False)
    extra = ["--python-only"] if request.param == "python" else []
    cs = start_cacheserver("-Y", str(credentials), *extra, udp=False)
    yield mc, cs
    mc.stop()
    cs.stop()


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_replies_are_byte_equal_to_memcached(pair, name: str) -> None:
    mc, cs = pair
    expected = converse(mc, CONVERSATIONS[name])
    got = converse(cs, CONVERSATIONS[name])
    assert got == expected, "\n".join(
        f"{step!r}\n  memcached:   {e!r}\n  cacheserver: {g!r}"
        for step, e, g in zip(CONVERSATIONS[name], expected, got, strict=True)
        if e != g
    )


def test_the_conversations_cover_every_reply(pair) -> None:
    """Guard against scripts that silently stopped covering what they claim to cover."""
    mc, _ = pair
    seen = b"".join(b"".join(converse(mc, steps)) for steps in CONVERSATIONS.values())
    for line in (
        b"CLIENT_ERROR unauthenticated\r\n",
        b"CLIENT_ERROR authentication failure\r\n",
        b"CLIENT_ERROR bad authentication token format\r\n",
        b"CLIENT_ERROR bad command line termination\r\n",
        b"STORED\r\nSTORED\r\nVALUE k 0 2\r\nhi\r\nEND\r\nDELETED\r\nEND\r\n",
    ):
        assert line in seen, line


def test_a_line_of_junk_without_newline_is_hung_up_on(pair) -> None:
    for server in pair:
        assert converse(server, [b"x" * 3000]) == [b"<closed>"], server.name


def test_auth_counters_match_memcached(credentials: Path) -> None:
    mc = start_memcached("-Y", str(credentials), udp=False)
    cs = start_cacheserver("-Y", str(credentials), udp=False)
    try:
        steps = CONVERSATIONS["malformed and wrong credentials"] + [b"stats\r\n"]
        for server in (mc, cs):
            converse(server, steps)
        counted = [_stats_after_login(s) for s in (mc, cs)]
        # 4 wrong passwords, then a login in the conversation and one to read the stats.
        assert (counted[0]["auth_cmds"], counted[0]["auth_errors"]) == ("6", "4")
        for name in ("auth_cmds", "auth_errors"):
            assert counted[1][name] == counted[0][name], name
        settings = [_stats_after_login(s, "settings") for s in (mc, cs)]
        assert settings[0]["auth_enabled_ascii"] == settings[1]["auth_enabled_ascii"]
        assert settings[1]["auth_enabled_ascii"] == str(credentials)
    finally:
        mc.stop()
        cs.stop()


def _stats_after_login(server: RunningServer, sub: str = "") -> dict[str, str]:
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(LOGIN)
        assert recv_until(sock, b"\r\n") == b"STORED\r\n"
        sock.sendall(f"stats {sub}".strip().encode() + b"\r\n")
        reply = recv_until(sock, b"END\r\n").decode()
    return {
        parts[1]: parts[2]
        for parts in (line.split(" ", 2) for line in reply.splitlines())
        if len(parts) == 3 and parts[0] == "STAT"
    }


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_each_unauthenticated_request_is_answered(credentials: Path, path: str) -> None:
    """The one deliberate difference: several requests in one write get one reply each."""
    cs = start_cacheserver(
        "-Y", str(credentials), *(["--python-only"] if path == "python" else []), udp=False
    )
    try:
        replies = converse(cs, [b"get a\r\nset a 0 0 5\r\nalice\r\n" + LOGIN + b"get a\r\n"])
        assert replies == [
            b"CLIENT_ERROR unauthenticated\r\n"
            b"CLIENT_ERROR bad authentication token format\r\n"
            b"STORED\r\nEND\r\n"
        ]
    finally:
        cs.stop()


def test_a_changed_credentials_file_is_taken_without_a_restart(tmp_path: Path) -> None:
    """memcached reloads on SIGHUP; this server also sees the file change by itself (a
    Secret volume updated by the kubelet), and keeps the old entries while the new file is
    broken."""
    path = tmp_path / "credentials"
    path.write_bytes(b"alice:secret\n")
    mc = start_memcached("-Y", str(path), udp=False)
    cs = start_cacheserver("-Y", str(path), udp=False)
    new_login = [b"set a 0 0 12\r\nalice second\r\n"]
    try:
        # Replaced as the kubelet does: a new file renamed over the old one.
        _replace(path, b"alice:second\n")
        mc.proc.send_signal(signal.SIGHUP)
        for server in (mc, cs):
            _wait_for(lambda s=server: converse(s, new_login) == [b"STORED\r\n"], server.name)
            assert converse(server, [LOGIN]) == [b"CLIENT_ERROR authentication failure\r\n"]
        # A broken file: this server keeps serving the last good credentials.
        _replace(path, b"no colon here\n")
        cs.proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        assert converse(cs, new_login) == [b"STORED\r\n"]
        assert stats_with_login(cs, b"alice second")["auth_file_load_errors"] != "0"
    finally:
        mc.stop()
        cs.stop()


def stats_with_login(server: RunningServer, user_password: bytes) -> dict[str, str]:
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"set a 0 0 %d\r\n%s\r\nstats\r\n" % (len(user_password), user_password))
        reply = recv_until(sock, b"END\r\n").decode()
    assert reply.startswith("STORED\r\n"), reply
    return {
        parts[1]: parts[2]
        for parts in (line.split(" ", 2) for line in reply.splitlines())
        if len(parts) == 3 and parts[0] == "STAT"
    }


def _replace(path: Path, data: bytes) -> None:
    fresh = path.with_suffix(".new")
    fresh.write_bytes(data)
    os.replace(fresh, path)


def _wait_for(check, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout} s")
        time.sleep(0.2)


def test_udp_is_refused_with_authentication_as_memcached_refuses_it(credentials: Path) -> None:
    port = free_port()
    args = ["-l", "127.0.0.1", "-p", str(port), "-U", str(port), "-Y", str(credentials)]
    mc = subprocess.run(
        ["memcached", *args, *(["-u", "root"] if os.geteuid() == 0 else [])],
        capture_output=True,
        text=True,
        timeout=10,
    )
    cs = subprocess.run(
        [sys.executable, "-m", "cacheserver", *args], capture_output=True, text=True, timeout=30
    )
    sentence = "Cannot use UDP with ascii authentication enabled (-U 0 to disable)"
    assert mc.returncode != 0 and sentence in mc.stderr
    assert cs.returncode != 0 and sentence in cs.stderr


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "No such file"),
        (b"", "is empty"),
        (b"alice:secret\n\n", "line 2 is not user:password"),
        (b"no colon\n", "line 1 is not user:password"),
    ],
)
def test_a_bad_credentials_file_stops_the_server_naming_it(
    tmp_path: Path, content: bytes | None, why: str
) -> None:
    path = tmp_path / "credentials"
    if content is not None:
        path.write_bytes(content)
    log = tmp_path / "termination-log"
    log.write_bytes(b"")
    run = run_to_exit(log, "-p", str(free_port()), "-Y", str(path))
    assert run.returncode != 0
    message = log.read_text()
    assert message.startswith("cannot use the credentials file (-Y)") and why in message
    assert str(path) in message


FLUSH_SCRIPT: list[Step] = [
    b"set k 0 0 1\r\nx\r\n",
    b"flush_all\r\n",
    b"flush_all 0\r\n",
    b"flush_all abc\r\n",
    b"flush_all 1 2 3\r\n",
    (b"flush_all noreply\r\n", None),
    b"get k\r\n",
]


def test_disabled_flush_all_answers_as_memcached() -> None:
    mc = start_memcached("-F", udp=False)
    cs = start_cacheserver("-F", udp=False)
    try:
        replies = [converse(s, FLUSH_SCRIPT) for s in (mc, cs)]
        assert replies[1] == replies[0]
        assert b"CLIENT_ERROR flush_all not allowed\r\n" in replies[0]
        assert b"VALUE k 0 1\r\nx\r\nEND\r\n" in replies[0]
        assert stats(cs)["cmd_flush"] == stats(mc)["cmd_flush"] == "4"  # not the ERROR one
        assert stats(cs, "settings")["flush_enabled"] == stats(mc, "settings")["flush_enabled"]
    finally:
        mc.stop()
        cs.stop()


def test_the_compiled_path_takes_a_client_only_once_it_has_authenticated(
    credentials: Path,
) -> None:
    """The boundary: a client that has not authenticated is served in Python (whose session
    runs the exchange); once in, it moves to the compiled path's epoll set."""

    async def scenario() -> None:
        store = Store(1 << 20)
        counters = Counters()
        engine = make_engine(store, counters, LatencyHistogram())
        commands = Commands(store, counters, "test")
        tcp = TCPServer(
            commands, counters, 16, 0, engine=engine, credentials=CredentialsFile(str(credentials))
        )
        listener = tcp.listen("127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        with socket.socket() as client:
            client.setblocking(False)
            await loop.sock_connect(client, listener.getsockname())

            async def ask(payload: bytes) -> bytes:
                await loop.sock_sendall(client, payload)
                return await asyncio.wait_for(loop.sock_recv(client, 4096), 5)

            assert await ask(b"get k\r\n") == b"CLIENT_ERROR unauthenticated\r\n"
            (conn,) = tcp.connections.values()
            assert not conn.authenticated and conn.poller is not tcp._epoll
            assert await ask(LOGIN) == b"STORED\r\n"
            assert conn.authenticated and conn.poller is tcp._epoll
            assert (
                await ask(b"set k 0 0 1\r\nx\r\nget k\r\n")
                == b"STORED\r\nVALUE k 0 1\r\nx\r\nEND\r\n"
            )
        tcp.close()

    uvloop.run(scenario())


def test_a_client_that_logs_in_on_a_reused_descriptor_keeps_its_partial_request(
    credentials: Path,
) -> None:
    """The compiled path remembers per file descriptor that a connection has nothing held
    back; a client that logs in with half a data block on the descriptor of one closed from
    Python (as the idle sweep closes) must not be served as that one was."""

    async def scenario() -> None:
        store = Store(1 << 20)
        counters = Counters()
        engine = make_engine(store, counters, LatencyHistogram())
        commands = Commands(store, counters, "test")
        tcp = TCPServer(
            commands, counters, 16, 0, engine=engine, credentials=CredentialsFile(str(credentials))
        )
        listener = tcp.listen("127.0.0.1", 0)
        loop = asyncio.get_running_loop()

        async def connect() -> socket.socket:
            client = socket.socket()
            client.setblocking(False)
            await loop.sock_connect(client, listener.getsockname())
            return client

        async def ask(client: socket.socket, payload: bytes) -> bytes:
            await loop.sock_sendall(client, payload)
            return await asyncio.wait_for(loop.sock_recv(client, 4096), 5)

        with await connect() as first:
            assert await ask(first, LOGIN + b"get k\r\n") == b"STORED\r\nEND\r\n"
            assert await ask(first, b"get k\r\n") == b"END\r\n"  # served in C
            ((fd, conn),) = tcp.connections.items()
            tcp.close_connection(fd, conn)
        with await connect() as second:
            assert await ask(second, LOGIN + b"set k 0 0 12\r\nhello") == b"STORED\r\n"
            assert fd in tcp.connections  # the same descriptor
            assert await ask(second, b"get k\r\n\r\n") == b"STORED\r\n"
            assert await ask(second, b"get k\r\n") == b"VALUE k 0 12\r\nhelloget k\r\n\r\nEND\r\n"
        tcp.close()

    uvloop.run(scenario())
