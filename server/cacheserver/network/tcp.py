"""TCP: every client socket in one epoll set, which the event loop watches as a single fd.

The OSv and Facebook lessons applied to a Python server: when the epoll fd turns readable,
one callback drains every ready socket (one loop wake-up for a batch of clients, not one
callback and transport object per client), reads go through one shared buffer, and a
connection costs only its socket and its protocol session (see W5 in docs/benchmarks.md).
Replies are written straight away; only what the kernel would not take is kept, and the
connection stops being read until that is flushed (back-pressure).

With the compiled fast path there are two epoll sets. The compiled path serves one of them,
and a connection is in it only when the fast path may serve it: plaintext TCP, and
authenticated when -Y is on. Everything else -- a client that has not authenticated yet, TLS
connections, the admin socket -- is in the other set, served here in Python; a plaintext
client moves over once it has authenticated. So the compiled path never sees a request from
a client that has not authenticated, and an authenticated one costs it nothing extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import socket
import ssl
import stat
from time import perf_counter
from typing import TYPE_CHECKING, Any

from cacheserver.metrics.counters import Counters
from cacheserver.metrics.latency import SAMPLE_MASK, LatencyHistogram
from cacheserver.network import format_address
from cacheserver.protocol.commands import Commands
from cacheserver.protocol.session import TCP_REPLY_LIMIT, TextSession

if TYPE_CHECKING:
    from cacheserver.discovery.watch import ClusterConfig
    from cacheserver.security.credentials import CredentialsFile
    from cacheserver.security.tls import ServerTLS

TOO_MANY_CONNECTIONS = b"ERROR Too many open connections\r\n"
READ_SIZE = 65536
BATCH = 512  # sockets handled per wake-up; the rest wait for the next loop iteration
# Out of file descriptors, the listeners stop being watched for this long (memcached disables
# its listener the same way); else a readable listener whose accept fails would spin the loop.
ACCEPT_PAUSE = 0.1
_NO_DESCRIPTORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT
_GONE = select.EPOLLHUP | select.EPOLLERR
_READABLE = _IN | _GONE
# The admin socket (--admin-socket) answers these and nothing else, without authentication.
ADMIN_COMMANDS = frozenset((b"version", b"stats"))
ADMIN_REFUSED = b"SERVER_ERROR command not allowed on the admin socket\r\n"


class Connection(TextSession):
    """One client: the protocol session plus its socket and what it still has to send."""

    __slots__ = ("fast", "pending", "poller", "seen_tick", "sock")
    tls = False

    def __init__(
        self,
        commands: Commands,
        sock: socket.socket,
        tick: int,
        discovery: ClusterConfig | None = None,
        credentials: CredentialsFile | None = None,
        fast: bool = True,
        allowed: frozenset[bytes] | None = None,
        refusal: bytes = ADMIN_REFUSED,
    ) -> None:
        super().__init__(
            commands,
            allowed=allowed,
            reply_limit=TCP_REPLY_LIMIT,
            discovery=discovery,
            credentials=credentials,
            refusal=refusal,
        )
        self.sock = sock
        self.seen_tick = tick
        self.pending = b""  # reply bytes the kernel has not taken yet
        # Whether the compiled path may serve it once authenticated (plaintext TCP only).
        self.fast = fast
        self.poller: select.epoll | None = None  # the epoll set it is registered in

    @property
    def plain(self) -> bool:
        """Nothing is held for this client: no partial or held-back request, no unsent reply,
        not closing. Only then does the compiled path serve a read of it itself."""
        return not self.pending and self.idle and not self.closing


class TLSConnection(Connection):
    """A client of a TLS listener: ``sock`` is an ``ssl.SSLSocket``; ``ready`` once its
    handshake is done. Served in Python (the compiled path never sees TLS bytes); the
    plaintext it decrypts runs through the compiled path's request code all the same."""

    __slots__ = ("ready",)
    tls = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, fast=False, **kwargs)
        self.ready = False


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
        credentials: CredentialsFile | None = None,
    ) -> None:
        self.commands = commands
        # Auto discovery (`config get cluster`) is answered over TCP only.
        self.discovery = discovery
        self.credentials = credentials  # -Y: every TCP client authenticates first
        self.counters = counters
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.latency = latency if latency is not None else LatencyHistogram()
        self.tick = 0
        self.current_fd = -1  # the connection whose requests are being run (stats conns)
        self.connections: dict[int, Connection] = {}
        # The compiled path's set, or the only one when there is no compiled path.
        self._epoll = select.epoll()
        # Connections the compiled path must not serve (see the module's docstring).
        self._python = select.epoll() if engine is not None else self._epoll
        self._listeners: list[socket.socket] = []
        self._accepts: dict[socket.socket, Any] = {}  # each listener's accept callback
        self._resume: asyncio.TimerHandle | None = None  # set while the listeners are paused
        self._admin_path: str | None = None
        self._buffer = bytearray(READ_SIZE)
        self._view = memoryview(self._buffer)
        self._loop: asyncio.AbstractEventLoop | None = None
        # The compiled fast path (cacheserver/fastpath) serves plain gets and sets and calls
        # back into serve_event, finish_read, send and close_connection for everything else
        # (fastpath/boundary.py declares what it uses of this class and of Connection).
        self._engine = engine
        if engine is not None:
            engine.attach_tcp(self._epoll.fileno(), self, Connection)

    def listen(
        self, host: str, port: int, backlog: int = 1024, tls: ServerTLS | None = None
    ) -> socket.socket:
        """A TCP listener; with ``tls``, its clients speak TLS (its context at their accept)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, port), family=family, backlog=backlog)
        if tls is None:
            self._add_listener(listener, self._accept_tcp)
        else:
            self._add_listener(listener, lambda sock: self._accept_tls(sock, tls))
        return listener

    def listen_admin(self, path: str) -> socket.socket:
        """The admin socket: a Unix socket only this user may connect to, answering
        ``version`` and ``stats`` without authentication or TLS."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # left by an earlier run of this server
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(path)
        finally:
            os.umask(old_umask)
        listener.listen(64)
        self._admin_path = path
        self._add_listener(listener, self._accept_admin)
        return listener

    def _add_listener(self, listener: socket.socket, accept: Any) -> None:
        listener.setblocking(False)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            serve = self._serve_ready if self._engine is None else self._engine.serve_tcp
            self._loop.add_reader(self._epoll.fileno(), serve)
            if self._python is not self._epoll:
                self._loop.add_reader(self._python.fileno(), self._serve_python)
        self._listeners.append(listener)
        self._accepts[listener] = accept
        if self._resume is None:
            self._loop.add_reader(listener.fileno(), accept, listener)

    @property
    def accepting(self) -> bool:
        """Whether the listeners are watched (``stats``' accepting_conns)."""
        return self._resume is None

    def _pause_accepting(self) -> None:
        """Out of file descriptors: stop watching the listeners for a moment; the clients
        wait in the backlog meanwhile. Counted as memcached's listen_disabled_num."""
        loop = self._loop
        if self._resume is not None or loop is None:
            return
        self.counters.listen_disabled_num += 1
        for listener in self._listeners:
            loop.remove_reader(listener.fileno())
        self._resume = loop.call_later(ACCEPT_PAUSE, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        for listener in self._listeners:
            self._loop.add_reader(listener.fileno(), self._accepts[listener], listener)

    # -- accepting -----------------------------------------------------------------------------

    def _accepted(self, listener: socket.socket, limited: bool = True) -> list[socket.socket]:
        """The clients waiting on ``listener`` (a batch), those over the limit refused."""
        counters = self.counters
        out = []
        for _ in range(BATCH):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                if err.errno in _NO_DESCRIPTORS:
                    self._pause_accepting()
                break
            counters.total_connections += 1
            if limited and len(self.connections) >= self.limit:
                counters.rejected_connections += 1
                with contextlib.suppress(OSError):
                    sock.send(TOO_MANY_CONNECTIONS)
                sock.close()
                continue
            sock.setblocking(False)
            out.append(sock)
        return out

    def _accept_tcp(self, listener: socket.socket) -> None:
        for sock in self._accepted(listener):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(self.commands, sock, self.tick, self.discovery, self.credentials)
            self._register(sock.fileno(), conn)

    def _accept_tls(self, listener: socket.socket, tls: ServerTLS) -> None:
        for sock in self._accepted(listener):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                wrapped = tls.context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
            except (ssl.SSLError, OSError):
                sock.close()
                continue
            conn = TLSConnection(
                self.commands, wrapped, self.tick, self.discovery, self.credentials
            )
            self._register(wrapped.fileno(), conn)

    def _accept_admin(self, listener: socket.socket) -> None:
        # Not counted against -c: a probe must get through to a server that is full.
        for sock in self._accepted(listener, limited=False):
            conn = Connection(self.commands, sock, self.tick, fast=False, allowed=ADMIN_COMMANDS)
            self._register(sock.fileno(), conn)

    def _register(self, fd: int, conn: Connection) -> None:
        poller = self._epoll if conn.fast and conn.authenticated else self._python
        conn.poller = poller
        self.connections[fd] = conn
        if poller is self._epoll and self._engine is not None:
            self._engine.watch(fd)  # what it knew of this fd was about another connection
        poller.register(fd, _IN)
        self.counters.curr_connections += 1

    def _promote(self, fd: int, conn: Connection) -> None:
        """A client that has just authenticated: from now on the compiled path serves it."""
        self._python.unregister(fd)
        self._engine.watch(fd)  # type: ignore[union-attr]
        self._epoll.register(fd, _OUT if conn.pending else _IN)
        conn.poller = self._epoll

    # -- serving -------------------------------------------------------------------------------

    def _serve_ready(self) -> None:
        connections = self.connections
        for fd, events in self._epoll.poll(0, BATCH):
            conn = connections.get(fd)
            if conn is not None:
                self.serve_event(fd, conn, events)

    def _serve_python(self) -> None:
        connections = self.connections
        for fd, events in self._python.poll(0, BATCH):
            conn = connections.get(fd)
            if conn is None:
                continue
            # The common case of this set first: a TLS client with a request and no replies
            # waiting.
            if conn.tls and conn.ready and events & _READABLE and not conn.pending:  # type: ignore[attr-defined]
                self._read_tls(fd, conn)
            else:
                self.serve_event(fd, conn, events)

    def serve_event(self, fd: int, conn: Connection, events: int) -> None:
        """Whatever epoll reported for a client: a handshake step, a flush of pending replies,
        a read. (The compiled path hands over every event of a connection that is not
        ``plain``, and every event other than a plain read.)"""
        if conn.tls and not conn.ready:  # type: ignore[attr-defined]
            self._handshake(fd, conn)
            return
        if events & _OUT and conn.pending:
            self._flush(fd, conn)
        if events & (_IN | _GONE) and not conn.pending:
            self._read(fd, conn)

    def _read(self, fd: int, conn: Connection) -> None:
        if conn.tls:
            self._read_tls(fd, conn)
            return
        try:
            n = conn.sock.recv_into(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:  # the client closed (or reset) its side: nothing more will come
            self.close_connection(fd, conn)
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
        promote = conn.poller is not self._epoll and conn.fast and conn.authenticated
        if promote and self.connections.get(fd) is conn:
            self._promote(fd, conn)

    # -- TLS -----------------------------------------------------------------------------------

    def _handshake(self, fd: int, conn: Connection) -> None:
        try:
            conn.sock.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            conn.poller.modify(fd, _IN)
            return
        except ssl.SSLWantWriteError:
            conn.poller.modify(fd, _OUT)
            return
        except OSError:  # not TLS (a plaintext client), a certificate refused, a reset
            self.counters.ssl_handshake_errors += 1
            self.close_connection(fd, conn)
            return
        conn.ready = True  # type: ignore[attr-defined]
        conn.poller.modify(fd, _IN)
        self._read_tls(fd, conn)  # the client's first requests may have come with its Finished

    def _read_tls(self, fd: int, conn: Connection) -> None:
        """Decrypt what arrived and run it; the requests the compiled path knows go through
        its request code (``engine.run``) on the plaintext, the rest through the session.
        Written out for the common case (the replies go at once), as the Python path's
        cost per read is what a TLS client without pipelining pays per request."""
        sock = conn.sock
        counters = self.counters
        latency = self.latency
        engine = self._engine
        buffer = self._buffer
        while True:
            try:
                n = sock.recv_into(buffer)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError:  # a reset, a TLS alert, bad records
                n = 0
            if n == 0:
                self.close_connection(fd, conn)
                return
            data = bytes(self._view[:n])
            conn.seen_tick = self.tick
            counters.bytes_read += n
            latency.reads += 1
            started = 0.0 if latency.reads & SAMPLE_MASK else perf_counter()
            if engine is not None and conn.authenticated and conn.idle and not conn.closing:
                out, done = engine.run(data)
                if done < n:
                    out += conn.feed(data[done:])
            else:
                out = conn.feed(data)
            if started:
                latency.observe(perf_counter() - started)
            if not out or conn.closing or conn.held:
                self._reply(fd, conn, out)
            else:
                counters.bytes_written += len(out)
                try:
                    sent = sock.send(out)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    sent = -1
                except OSError:
                    self.close_connection(fd, conn)
                    return
                if sent != len(out):
                    # OpenSSL wants the same bytes again once it can go on; the rest of
                    # what it took: see _write.
                    conn.pending = out if sent < 0 else out[sent:]
                    conn.poller.modify(fd, _OUT)
                    return
            if conn.pending or self.connections.get(fd) is not conn:
                return
            # OpenSSL reads one record at a time and SSL_read returns all of it when it fits:
            # bytes it still holds (which level-triggered epoll says nothing of) can only be
            # left when the buffer was filled.
            if n < READ_SIZE or not sock.pending():  # type: ignore[attr-defined]
                return

    def finish_read(self, fd: int, conn: Connection, head: bytes, rest: bytes) -> None:
        """The compiled path ran the requests that gave ``head`` and leaves ``rest`` (already
        counted as read) to the session: reply, and go on as ``_read`` does."""
        self.current_fd = fd
        self._reply(fd, conn, head + conn.feed(rest))

    def _reply(self, fd: int, conn: Connection, out: bytes) -> None:
        while True:
            if out:
                self.counters.bytes_written += len(out)
                self.send(fd, conn, out)
            if conn.closing and not conn.pending:
                self.close_connection(fd, conn)
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
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            # OpenSSL has taken part of it and wants the same bytes again when it can go on.
            conn.pending = out
            return False
        except OSError:
            self.close_connection(fd, conn)
            return False
        conn.pending = out[sent:] if sent < len(out) else b""
        return not conn.pending

    def send(self, fd: int, conn: Connection, out: bytes) -> None:
        """Send replies (already counted as written); what the kernel does not take stays in
        ``conn.pending``, and the client is not read until it has taken it."""
        if not self._write(fd, conn, out) and fd in self.connections:
            # The client is not reading fast enough: stop reading its requests until it has
            # taken the replies it already has.
            conn.poller.modify(fd, _OUT)

    def _flush(self, fd: int, conn: Connection) -> None:
        if not self._write(fd, conn, conn.pending):
            return
        if conn.closing:
            self.close_connection(fd, conn)
            return
        conn.poller.modify(fd, _IN)
        if conn.held:
            self._reply(fd, conn, conn.feed(b""))
        elif conn.tls and conn.sock.pending():  # type: ignore[attr-defined]
            self._read_tls(fd, conn)

    def close_connection(self, fd: int, conn: Connection) -> None:
        """Close a client (one that closed its side, or that is closed from here)."""
        if self.connections.pop(fd, None) is None:
            return
        try:
            conn.poller.unregister(fd)
        except OSError as err:
            if err.errno != errno.EBADF:
                raise
        if conn.tls and conn.ready:  # type: ignore[attr-defined]
            # A close_notify, as memcached sends; the client's answer is not waited for.
            with contextlib.suppress(OSError, ValueError):
                conn.sock.unwrap()  # type: ignore[attr-defined]
        conn.sock.close()
        self.counters.curr_connections -= 1

    # -- housekeeping --------------------------------------------------------------------------

    def conns_lines(self, period: float) -> list[tuple[int, str, str]]:
        """``stats conns``: the listening socket and every client, as memcached lists them
        (fd, name, value); ``period``: the seconds of one sweep tick."""
        lines: list[tuple[int, str, str]] = []
        for listener in self._listeners:
            if listener.family == socket.AF_UNIX:
                continue  # the admin socket: not a listener memcached would have
            fd = listener.fileno()
            lines += [
                (fd, "addr", format_address("tcp", listener.getsockname())),
                (fd, "state", "conn_listening"),
                (fd, "secs_since_last_cmd", str(int(self.tick * period))),
            ]
        for fd, conn in self.connections.items():
            if conn.sock.family == socket.AF_UNIX:
                continue  # an admin connection (the probe)
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
                self.close_connection(fd, conn)

    def close(self) -> None:
        loop = self._loop
        if self._resume is not None:
            self._resume.cancel()
        elif loop is not None:
            for listener in self._listeners:
                loop.remove_reader(listener.fileno())
        if loop is not None:
            loop.remove_reader(self._epoll.fileno())
            if self._python is not self._epoll:
                loop.remove_reader(self._python.fileno())
        for fd, conn in list(self.connections.items()):
            self.close_connection(fd, conn)
        for listener in self._listeners:
            listener.close()
        if self._admin_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._admin_path)
        self._epoll.close()
        if self._python is not self._epoll:
            self._python.close()
