"""TCP: every client socket in one epoll set, which the event loop watches as a single fd.

The OSv and Facebook lessons applied to a Python server: when the epoll fd turns readable,
one callback drains every ready socket (one loop wake-up for a batch of clients, not one
callback and transport object per client), reads go through one shared buffer, and a
connection costs only its socket and its protocol session (see W5 in docs/benchmarks.md).
Replies are written straight away; only what the kernel would not take is kept, and the
connection stops being read until that is flushed (back-pressure).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import select
import socket
from time import perf_counter
from typing import TYPE_CHECKING, Any

from cacheserver.metrics.counters import Counters
from cacheserver.metrics.latency import SAMPLE_MASK, LatencyHistogram
from cacheserver.network import format_address
from cacheserver.protocol.commands import Commands
from cacheserver.protocol.session import TCP_REPLY_LIMIT, TextSession

if TYPE_CHECKING:
    from cacheserver.discovery.watch import ClusterConfig

TOO_MANY_CONNECTIONS = b"ERROR Too many open connections\r\n"
READ_SIZE = 65536
BATCH = 512  # sockets handled per wake-up; the rest wait for the next loop iteration
_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT
_GONE = select.EPOLLHUP | select.EPOLLERR


class Connection(TextSession):
    """One client: the protocol session plus its socket and what it still has to send."""

    __slots__ = ("pending", "seen_tick", "sock")

    def __init__(
        self,
        commands: Commands,
        sock: socket.socket,
        tick: int,
        discovery: ClusterConfig | None = None,
    ) -> None:
        super().__init__(commands, reply_limit=TCP_REPLY_LIMIT, discovery=discovery)
        self.sock = sock
        self.seen_tick = tick
        self.pending = b""  # reply bytes the kernel has not taken yet


class TCPServer:
    """Accepts clients on one listening socket and serves them from one epoll set."""

    def __init__(
        self,
        commands: Commands,
        counters: Counters,
        limit: int,
        idle_timeout: float,
        latency: LatencyHistogram | None = None,
        engine: Any | None = None,
        discovery: ClusterConfig | None = None,
    ) -> None:
        self.commands = commands
        # Auto discovery (`config get cluster`) is answered over TCP only.
        self.discovery = discovery
        self.counters = counters
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.latency = latency if latency is not None else LatencyHistogram()
        self.tick = 0
        self.current_fd = -1  # the connection whose requests are being run (stats conns)
        self.connections: dict[int, Connection] = {}
        self._epoll = select.epoll()
        self._listener: socket.socket | None = None
        self._buffer = bytearray(READ_SIZE)
        self._view = memoryview(self._buffer)
        self._loop: asyncio.AbstractEventLoop | None = None
        # The compiled fast path (cacheserver/fastpath) serves plain gets and sets and calls
        # back into the methods below for everything else.
        self._engine = engine
        if engine is not None:
            engine.attach_tcp(self._epoll.fileno(), self.connections, self, Connection)

    def listen(self, host: str, port: int, backlog: int = 1024) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, port), family=family, backlog=backlog)
        listener.setblocking(False)
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(listener.fileno(), self._accept)
        serve = self._serve_ready if self._engine is None else self._engine.serve_tcp
        self._loop.add_reader(self._epoll.fileno(), serve)
        return listener

    # -- accepting -----------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        counters = self.counters
        for _ in range(BATCH):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and friends: try again on the next readiness
                return
            counters.total_connections += 1
            if len(self.connections) >= self.limit:
                counters.rejected_connections += 1
                with contextlib.suppress(OSError):
                    sock.send(TOO_MANY_CONNECTIONS)
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(self.commands, sock, self.tick, self.discovery)
            fd = sock.fileno()
            self.connections[fd] = conn
            self._epoll.register(fd, _IN)
            counters.curr_connections += 1

    # -- serving -------------------------------------------------------------------------------

    def _serve_ready(self) -> None:
        connections = self.connections
        for fd, events in self._epoll.poll(0, BATCH):
            conn = connections.get(fd)
            if conn is not None:
                self._serve_event(fd, conn, events)

    def _serve_event(self, fd: int, conn: Connection, events: int) -> None:
        if events & _OUT and conn.pending:
            self._flush(fd, conn)
        if events & (_IN | _GONE) and not conn.pending:
            self._read(fd, conn)

    def _read(self, fd: int, conn: Connection) -> None:
        try:
            n = conn.sock.recv_into(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:  # the client closed (or reset) its side: nothing more will come
            self._close(fd, conn)
            return
        data = bytes(self._view[:n])
        conn.seen_tick = self.tick
        self.current_fd = fd
        counters = self.counters
        counters.bytes_read += n
        latency = self.latency
        latency.reads += 1
        if latency.reads & SAMPLE_MASK:
            out = conn.feed(data)
        else:
            started = perf_counter()
            out = conn.feed(data)
            latency.observe(perf_counter() - started)
        self._reply(fd, conn, out)

    def _continue(self, fd: int, conn: Connection, head: bytes, rest: bytes) -> None:
        """The compiled path ran the requests that gave ``head`` and leaves ``rest`` (already
        counted as read) to the session."""
        self.current_fd = fd
        self._reply(fd, conn, head + conn.feed(rest))

    def _reply(self, fd: int, conn: Connection, out: bytes) -> None:
        while True:
            if out:
                self.counters.bytes_written += len(out)
                self._send(fd, conn, out)
            if conn.closing and not conn.pending:
                self._close(fd, conn)
                return
            # Requests held back by the session's reply limit go on once the kernel has
            # taken the replies so far; while it has not, _flush resumes them.
            if conn.pending or not conn.held or fd not in self.connections:
                return
            out = conn.feed(b"")

    def _write(self, fd: int, conn: Connection, out: bytes) -> bool:
        """Send what the kernel takes; keep the rest in ``pending``. True when all went."""
        try:
            sent = conn.sock.send(out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(fd, conn)
            return False
        conn.pending = out[sent:] if sent < len(out) else b""
        return not conn.pending

    def _send(self, fd: int, conn: Connection, out: bytes) -> None:
        if not self._write(fd, conn, out) and fd in self.connections:
            # The client is not reading fast enough: stop reading its requests until it has
            # taken the replies it already has.
            self._epoll.modify(fd, _OUT)

    def _flush(self, fd: int, conn: Connection) -> None:
        if not self._write(fd, conn, conn.pending):
            return
        if conn.closing:
            self._close(fd, conn)
            return
        self._epoll.modify(fd, _IN)
        if conn.held:
            self._reply(fd, conn, conn.feed(b""))

    def _close(self, fd: int, conn: Connection) -> None:
        if self.connections.pop(fd, None) is None:
            return
        try:
            self._epoll.unregister(fd)
        except OSError as err:
            if err.errno != errno.EBADF:
                raise
        conn.sock.close()
        self.counters.curr_connections -= 1

    # -- housekeeping --------------------------------------------------------------------------

    def conns_lines(self, period: float) -> list[tuple[int, str, str]]:
        """``stats conns``: the listening socket and every client, as memcached lists them
        (fd, name, value); ``period``: the seconds of one sweep tick."""
        lines: list[tuple[int, str, str]] = []
        if self._listener is not None:
            fd = self._listener.fileno()
            lines += [
                (fd, "addr", format_address("tcp", self._listener.getsockname())),
                (fd, "state", "conn_listening"),
                (fd, "secs_since_last_cmd", str(int(self.tick * period))),
            ]
        for fd, conn in self.connections.items():
            try:
                peer, local = conn.sock.getpeername(), conn.sock.getsockname()
            except OSError:
                continue
            if fd == self.current_fd:
                state = "conn_parse_cmd"
            elif conn.pending:
                state = "conn_mwrite"
            elif not conn.idle and conn._request is not None:
                state = "conn_swallow" if conn._request.swallow is not None else "conn_nread"
            else:
                state = "conn_read"
            lines += [
                (fd, "addr", format_address("tcp", peer)),
                (fd, "listen_addr", format_address("tcp", local)),
                (fd, "state", state),
                (fd, "secs_since_last_cmd", str(int((self.tick - conn.seen_tick) * period))),
            ]
        return lines

    def sweep(self, period: float) -> None:
        """Called every ``period`` seconds: close connections idle for the timeout or longer.

        Idle detection is tick-based: a read stores the current tick, so the request path
        never reads a clock for it.
        """
        self.tick += 1
        if self.idle_timeout <= 0:
            return
        max_idle_ticks = max(1, round(self.idle_timeout / period))
        for fd, conn in list(self.connections.items()):
            if self.tick - conn.seen_tick > max_idle_ticks and conn.idle and not conn.pending:
                self.counters.idle_kicks += 1
                self._close(fd, conn)

    def close(self) -> None:
        loop = self._loop
        if loop is not None:
            if self._listener is not None:
                loop.remove_reader(self._listener.fileno())
            loop.remove_reader(self._epoll.fileno())
        for fd, conn in list(self.connections.items()):
            self._close(fd, conn)
        if self._listener is not None:
            self._listener.close()
        self._epoll.close()
