"""Framing of the text protocol for one client: request bytes in, response bytes out.

Every complete request in the bytes fed is handled in one call (pipelining), and the replies
come back as one ``bytes`` so the network layer writes once. Only an incomplete request is
kept between calls: a partial command line, or the part of a data block seen so far.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cacheserver.discovery.membership import CLUSTER_KEY
from cacheserver.protocol.commands import (
    ERROR,
    STORAGE_COMMANDS,
    STORED,
    Commands,
    StorageRequest,
)
from cacheserver.protocol.numbers import parse_u64

if TYPE_CHECKING:
    from cacheserver.discovery.watch import ClusterConfig
    from cacheserver.security.credentials import CredentialsFile

# memcached closes a connection that sends this much without a newline, unless it is a get.
MAX_LINE = 2048
# A multi-get line may be longer; past this it is refused too, so one client cannot make the
# server buffer without bound.
MAX_MULTIGET_LINE = 2 * 1024 * 1024
UDP_REFUSED = b"SERVER_ERROR command not allowed over UDP\r\n"
METADUMP_PIPELINED = b"ERROR cannot pipeline other commands before metadump\r\n"
# Commands whose replies memcached sends before it reads the next request.
FLUSHING_COMMANDS = frozenset((b"get", b"gets", b"gat", b"gats", b"bget", b"mn"))
# memcached's -Y replies to a client that has not authenticated yet.
UNAUTHENTICATED = b"CLIENT_ERROR unauthenticated\r\n"
AUTH_FAILURE = b"CLIENT_ERROR authentication failure\r\n"
AUTH_BAD_FORMAT = b"CLIENT_ERROR bad authentication token format\r\n"
AUTH_BAD_TERMINATION = b"CLIENT_ERROR bad command line termination\r\n"
# The longest "<user> <password>" block worth waiting for: memcached's credentials file keeps
# 255 bytes per line. A longer announcement closes the connection (memcached buffers it until
# its 16 kB read buffer overflows and then resets the connection).
AUTH_MAX_BLOCK = 2048
# A TCP client's replies built in one go, at most (about): see TextSession's reply_limit.
TCP_REPLY_LIMIT = 4 * 1024 * 1024
# ElastiCache's auto-discovery request (answered only where the session has a ClusterConfig).
CONFIG_GET_CLUSTER = [b"get", b"cluster"]

# Commands whose reply is about the size of the request or of data the client stored: safe to
# answer over UDP without letting a forged source address amplify traffic.
UDP_SAFE_COMMANDS = (
    frozenset((b"get", b"gets", b"gat", b"gats", b"touch", b"delete", b"incr", b"decr", b"version"))
    | frozenset((b"mg", b"md", b"ma", b"mn", b"me"))
    | STORAGE_COMMANDS
)


class TextSession:
    __slots__ = (
        "_allowed",
        "_auth_need",
        "_buffer",
        "_chunks",
        "_commands",
        "_credentials",
        "_discovery",
        "_have",
        "_need",
        "_refusal",
        "_reply_limit",
        "_request",
        "authenticated",
        "closing",
        "held",
        "refused",
    )

    def __init__(
        self,
        commands: Commands,
        allowed: frozenset[bytes] | None = None,
        reply_limit: int | None = None,
        discovery: ClusterConfig | None = None,
        credentials: CredentialsFile | None = None,
        refusal: bytes = UDP_REFUSED,
    ) -> None:
        self._commands = commands
        # memcached's -Y: until the client has sent a "set" whose data is a user and password
        # from the credentials file, every request is answered by the exchange below.
        self._credentials = credentials
        self.authenticated = credentials is None
        self._auth_need = 0  # bytes of the announced "<user> <password>\r\n" block
        # What a command outside ``allowed`` gets.
        self._refusal = refusal
        self._allowed = allowed  # None: every command; else only these (UDP's guard)
        # The cluster membership for `config get cluster` and `get AmazonElastiCache:cluster`;
        # the TCP server passes it, UDP never does (a small request, a large reply: the
        # shape of an amplification attack), so over UDP both are what memcached makes of them.
        self._discovery = discovery
        # Past this many reply bytes in one feed, the requests left are held back until the
        # caller has sent the replies (feed(b"") then goes on): a burst of pipelined gets of
        # large values must not make the server build gigabytes of replies at once.
        self._reply_limit = reply_limit
        self.held = False  # requests are held back: call feed(b"") once the replies are sent
        self._buffer = b""
        self._request: StorageRequest | None = None
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 0
        self.closing = False  # set when the connection is to close after the reply is sent
        self.refused = 0  # commands refused by the allow-list

    def reset(self) -> None:
        """Forget any partial request and the close flag (a new datagram starts afresh)."""
        self._buffer = b""
        self._request = None
        self._chunks = []
        self._have = self._need = 0
        self.closing = False
        self.held = False
        self.refused = 0

    @property
    def idle(self) -> bool:
        """No partial request is held."""
        return not self._buffer and self._request is None and not self._auth_need

    def feed(self, data: bytes) -> bytes:
        if self.closing:
            return b""
        self.held = False
        out: list[bytes] = []
        if not self.authenticated:
            rest = self._authenticate(data, out)
            if rest is None:
                return b"".join(out)
            data = rest
        if self._request is not None:
            data = self._continue_block(data, out)
            if data is None:
                return b"".join(out)
        elif self._buffer:
            data = self._buffer + data
            self._buffer = b""
        self._parse(data, out)
        return b"".join(out)

    def _continue_block(self, data: bytes, out: list[bytes]) -> bytes | None:
        """Add bytes to the awaited data block; the bytes after it once complete, else None."""
        request = self._request
        assert request is not None
        self._have += len(data)
        if request.swallow is None:
            self._chunks.append(data)
        if self._have < self._need:
            return None
        extra = self._have - self._need
        if request.swallow is not None:
            out.append(request.swallow)
            rest = data[len(data) - extra :] if extra else b""
        else:
            block = b"".join(self._chunks)
            nbytes = request.nbytes
            out.append(
                self._commands.complete_storage(request, block[:nbytes], block[nbytes : nbytes + 2])
            )
            rest = block[nbytes + 2 :]
        self._request = None
        self._chunks = []
        return rest

    def _parse(self, data: bytes, out: list[bytes]) -> None:
        commands = self._commands
        allowed = self._allowed
        pos = 0
        n = len(data)
        limit = self._reply_limit
        discovery = self._discovery
        # Replies before this index are as good as sent: memcached writes a get's reply (and
        # mn's) at once, and only a metadump behind unsent replies is refused.
        flushed = 0
        size = 0  # bytes of retrieval replies so far (the only ones that can be large)
        while pos < n:
            if limit is not None and size > limit:
                self._buffer = data[pos:]
                self.held = True
                return
            eol = data.find(b"\n", pos)
            if eol < 0:
                self._keep_partial_line(data[pos:])
                return
            end = eol - 1 if eol - pos > 1 and data[eol - 1] == 13 else eol
            line = data[pos:end]
            if b"\x00" in line:  # memcached reads a command line as a C string: up to a NUL
                line = line[: line.index(b"\x00")]
            tokens = line.split(b" ")
            pos = eol + 1
            if b"" in tokens:
                tokens = [t for t in tokens if t]
            if not tokens or len(tokens[0]) < 2:
                out.append(ERROR)
                continue
            command = tokens[0]
            if allowed is not None and command not in allowed:
                self.refused += 1
                out.append(self._refusal)
                continue
            if (
                discovery is not None
                and command == b"get"
                and len(tokens) == 2
                and tokens[1] == CLUSTER_KEY
            ):
                # ElastiCache's older auto-discovery request (over TCP; the compiled path
                # leaves it here).
                reply = discovery.key_get()
                out.append(reply)
                size += len(reply)
                continue
            if command in STORAGE_COMMANDS:
                pos = self._storage(tokens, data, pos, out)
                continue
            if (
                command == b"lru_crawler"
                and len(out) > flushed
                and len(tokens) == 3
                and tokens[1] == b"metadump"
                and commands.dump_enabled
            ):
                # memcached streams a metadump from another thread: it refuses one that
                # would overtake replies of the same read still waiting to be sent.
                out.append(METADUMP_PIPELINED)
                continue
            handler = commands.handler(command)
            if handler is not None:
                reply = handler(tokens)
                out.append(reply)
                size += len(reply)
                if command in FLUSHING_COMMANDS:
                    flushed = len(out)
            elif command == b"quit":
                self.closing = True
                return
            elif command == b"shutdown":
                reply = commands.shutdown(tokens)
                if reply is None:  # the server is stopping: close without a reply
                    self.closing = True
                    return
                out.append(reply)
            elif command == b"config" and discovery is not None:
                reply = discovery.config_get() if tokens[1:] == CONFIG_GET_CLUSTER else ERROR
                out.append(reply)
                size += len(reply)
            elif tokens[-1].startswith(b"HTTP/"):
                # memcached drops connections that speak HTTP at it, without a reply.
                self.closing = True
                return
            else:
                out.append(ERROR)

    def _authenticate(self, data: bytes, out: list[bytes]) -> bytes | None:
        """memcached 1.6's exchange for a client that has not authenticated: each request
        line gets ``CLIENT_ERROR unauthenticated`` unless it is ``set <key> <flags> <exptime>
        <bytes>`` (key, flags and exptime are ignored, so is noreply), whose data block must be
        ``<user> <password>``. Returns what follows a successful exchange (the client's next
        requests), or None when everything was consumed or is kept for the next read.

        One difference: memcached answers only the last of several such requests that arrive
        in one read (each reply overwrites the one before); every request is answered here.
        """
        credentials = self._credentials
        assert credentials is not None
        counters = self._commands.counters
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        pos = 0
        n = len(data)
        while pos < n:
            need = self._auth_need
            if need:
                if n - pos < need:
                    self._buffer = data[pos:]
                    return None
                block = data[pos : pos + need]
                pos += need
                self._auth_need = 0
                if block[-2:] != b"\r\n":
                    out.append(AUTH_BAD_TERMINATION)
                    continue
                # memcached's tokenizer: C strings (a NUL ends them), split on spaces.
                tokens = [t for t in block[:-2].split(b"\0", 1)[0].split(b" ") if t]
                if len(tokens) < 2:
                    out.append(AUTH_BAD_FORMAT)
                    continue
                counters.auth_cmds += 1
                if credentials.check(tokens[0], tokens[1]):
                    self.authenticated = True
                    out.append(STORED)
                    return data[pos:]
                counters.auth_errors += 1
                out.append(AUTH_FAILURE)
                continue
            eol = data.find(b"\n", pos)
            if eol < 0 or n - pos < 2:  # memcached waits for 2 bytes: no request is shorter
                if n - pos > MAX_LINE:
                    self.closing = True  # as memcached: no newline in 2 kB is junk
                else:
                    self._buffer = data[pos:]
                return None
            line = data[pos:eol].split(b"\0", 1)[0]
            pos = eol + 1
            tokens = [t for t in line.split(b" ") if t]
            # memcached's safe_strtoul: "5\r" is 5, "-0" is 0, "-5" and "5x" are refused.
            size = parse_u64(tokens[4]) if len(tokens) >= 5 and tokens[0] == b"set" else None
            if size is None:
                out.append(UNAUTHENTICATED)
                continue
            if size + 2 > AUTH_MAX_BLOCK:
                self.closing = True
                return None
            self._auth_need = size + 2
        return None

    def _storage(self, tokens: list[bytes], data: bytes, pos: int, out: list[bytes]) -> int:
        """Handle a storage command line; returns the position after what it consumed."""
        request = self._commands.parse_storage(tokens)
        if isinstance(request, bytes):
            out.append(request)
            return pos
        nbytes = request.nbytes
        need = nbytes + 2
        n = len(data)
        if n - pos >= need:
            if request.swallow is not None:
                out.append(request.swallow)
            else:
                out.append(
                    self._commands.complete_storage(
                        request, data[pos : pos + nbytes], data[pos + nbytes : pos + need]
                    )
                )
            return pos + need
        self._request = request
        self._need = need
        self._have = n - pos
        self._chunks = [data[pos:]] if request.swallow is None else []
        return n

    def _keep_partial_line(self, rest: bytes) -> None:
        if len(rest) > MAX_LINE:
            head = rest.lstrip(b" ")
            is_get = len(rest) - len(head) <= 100 and (
                head.startswith(b"get ") or head.startswith(b"gets ")
            )
            if not is_get or len(rest) > MAX_MULTIGET_LINE:
                self.closing = True
                return
        self._buffer = rest
