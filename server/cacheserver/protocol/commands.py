"""Command semantics of memcached's text protocol, response lines byte-for-byte as memcached 1.6.

``Commands`` is shared by every connection of one worker. Line commands take the request's
tokens and return the response bytes; storage commands are split in two (``parse_storage`` for
the command line, ``complete_storage`` once the data block has arrived) because the session
layer owns the framing of data blocks.
"""

from __future__ import annotations

from collections.abc import Callable

from cacheserver.metrics.counters import Counters
from cacheserver.metrics.prefix_stats import PrefixStats
from cacheserver.protocol.dumps import cachedump, metadump, parse_classes
from cacheserver.protocol.meta import Meta
from cacheserver.protocol.numbers import I32_MAX, parse_i32, parse_u32, parse_u64
from cacheserver.protocol.request import StorageRequest
from cacheserver.storage import Outcome, Store
from cacheserver.storage.item import HEADER_SIZE, value_response, value_response_with_cas

KEY_MAX_LENGTH = 250
MAX_RELATIVE_EXPTIME = 60 * 60 * 24 * 30  # memcached's REALTIME_MAXDELTA: 30 days
EXPIRED = 1  # an absolute time long past: the item is stored already expired

ERROR = b"ERROR\r\n"
END = b"END\r\n"
OK = b"OK\r\n"
STORED = b"STORED\r\n"
NOT_STORED = b"NOT_STORED\r\n"
EXISTS = b"EXISTS\r\n"
NOT_FOUND = b"NOT_FOUND\r\n"
DELETED = b"DELETED\r\n"
TOUCHED = b"TOUCHED\r\n"
BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
BAD_DATA_CHUNK = b"CLIENT_ERROR bad data chunk\r\n"
BAD_EXPTIME = b"CLIENT_ERROR invalid exptime argument\r\n"
BAD_DELTA = b"CLIENT_ERROR invalid numeric delta argument\r\n"
NON_NUMERIC = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
DELETE_USAGE = b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"
TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
NO_MEMORY = b"SERVER_ERROR out of memory storing object\r\n"
SHUTDOWN_DISABLED = b"ERROR: shutdown not enabled\r\n"
SHUTDOWN_BAD_MODE = b"CLIENT_ERROR invalid shutdown mode\r\n"
FLUSH_DISABLED = b"CLIENT_ERROR flush_all not allowed\r\n"
BAD_LINE = b"CLIENT_ERROR bad command line\r\n"
ILLEGAL_SLAB = b"CLIENT_ERROR Illegal slab id\r\n"
CACHEDUMP_DISABLED = b"CLIENT_ERROR stats cachedump not allowed\r\n"
DETAIL_USAGE = b"CLIENT_ERROR usage: stats detail on|off|dump\r\n"
METADUMP_DISABLED = b"ERROR metadump not allowed\r\n"
BAD_CLASS = b"BADCLASS invalid class id\r\n"
MEMLIMIT_TOO_SMALL = b"MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m\r\n"
MEMLIMIT_NOT_BYTES = b"MEMLIMIT_ADJUST_FAILED input value is megabytes not bytes\r\n"
# refresh_certs on a server without -Z (memcached built with TLS support says this).
TLS_NOT_ENABLED = b"Error TLS not enabled\r\n"
NOREPLY = b"noreply"

_OUTCOME_LINES = {
    Outcome.STORED: STORED,
    Outcome.NOT_STORED: NOT_STORED,
    Outcome.EXISTS: EXISTS,
    Outcome.NOT_FOUND: NOT_FOUND,
    Outcome.TOO_LARGE: TOO_LARGE,
    Outcome.NO_MEMORY: NO_MEMORY,
}

# Commands followed by a data block (ms is the meta protocol's set).
STORAGE_COMMANDS = frozenset((b"set", b"add", b"replace", b"append", b"prepend", b"cas", b"ms"))

__all__ = ["STORAGE_COMMANDS", "Commands", "StorageRequest"]


class Commands:
    """The text protocol's commands for one worker's store and counters."""

    def __init__(
        self,
        store: Store,
        counters: Counters,
        version: str,
        stats_report: Callable[[bytes], bytes | None] | None = None,
        *,
        flush_enabled: bool = True,
        dump_enabled: bool = True,
        on_shutdown: Callable[[bool], None] | None = None,
        on_memlimit: Callable[[int], None] | None = None,
        refresh_certs: Callable[[], str | None] | None = None,
    ) -> None:
        """``flush_enabled`` (memcached's -F turns it off), ``dump_enabled`` (-X: no cachedump
        or metadump), ``on_shutdown`` (-A: called with graceful=True/False by shutdown),
        ``on_memlimit`` (cache_memlimit's new size in bytes; default: the store's capacity),
        ``refresh_certs`` (reloads the TLS certificates, returning None when they were taken
        or the reason they were not, as memcached's ``refresh_certs``; None: no -Z)."""
        self.store = store
        self._refresh_certs = refresh_certs
        self.counters = counters
        self.version_line = b"VERSION %s\r\n" % version.encode()
        self.verbosity = 0
        self._stats_report = stats_report
        self.flush_enabled = flush_enabled
        self.dump_enabled = dump_enabled
        self.on_shutdown = on_shutdown
        self.on_memlimit = on_memlimit or store.set_capacity
        # stats detail: the counters, and whether they are being kept (None: off).
        self.prefix_stats = PrefixStats()
        self.detail: PrefixStats | None = None
        self._line_handlers: dict[bytes, Callable[[list[bytes]], bytes]] = {
            b"get": self.get,
            b"bget": self.get,
            b"gets": self.gets,
            b"gat": self.gat,
            b"gats": self.gats,
            b"delete": self.delete,
            b"incr": self.incr,
            b"decr": self.decr,
            b"touch": self.touch,
            b"flush_all": self.flush_all,
            b"version": self.version,
            b"verbosity": self.verbosity_cmd,
            b"stats": self.stats,
            b"cache_memlimit": self.cache_memlimit,
            b"lru_crawler": self.lru_crawler,
            b"refresh_certs": self.refresh_certs,
        }
        # The meta protocol (ms, which has a data block, goes through parse_storage).
        self.meta = Meta(store, counters, self.absolute_exptime)
        self._line_handlers.update(
            {
                b"mg": self.meta.mg,
                b"md": self.meta.md,
                b"ma": self.meta.ma,
                b"mn": self.meta.mn,
                b"me": self.meta.me,
            }
        )

    @staticmethod
    def outcome_line(outcome: Outcome) -> bytes:
        return _OUTCOME_LINES[outcome]

    def handler(self, command: bytes) -> Callable[[list[bytes]], bytes] | None:
        return self._line_handlers.get(command)

    def absolute_exptime(self, exptime: int) -> int:
        """memcached's exptime rules: 0 never, negative expired, up to 30 days relative."""
        if exptime == 0:
            return 0
        if exptime < 0:
            return EXPIRED
        if exptime > MAX_RELATIVE_EXPTIME:
            return exptime  # an absolute Unix time; one in the past is already expired
        return self.store.now() + exptime

    # -- retrieval -----------------------------------------------------------------------------

    def get(self, tokens: list[bytes]) -> bytes:
        if len(tokens) < 2:
            return ERROR
        return self._retrieve(tokens, 1, with_cas=False, exptime=None)

    def gets(self, tokens: list[bytes]) -> bytes:
        if len(tokens) < 2:
            return ERROR
        return self._retrieve(tokens, 1, with_cas=True, exptime=None)

    def gat(self, tokens: list[bytes]) -> bytes:
        return self._gat(tokens, with_cas=False)

    def gats(self, tokens: list[bytes]) -> bytes:
        return self._gat(tokens, with_cas=True)

    def _gat(self, tokens: list[bytes], with_cas: bool) -> bytes:
        if len(tokens) < 2:
            return ERROR
        exptime = parse_i32(tokens[1])
        if exptime is None:
            return BAD_EXPTIME
        return self._retrieve(tokens, 2, with_cas, self.absolute_exptime(exptime))

    def _retrieve(
        self, tokens: list[bytes], first: int, with_cas: bool, exptime: int | None
    ) -> bytes:
        if exptime is None and not with_cas:
            return self._get_many(tokens, first)
        store = self.store
        counters = self.counters
        detail = self.detail
        fmt = value_response_with_cas if with_cas else value_response
        parts: list[bytes] = []
        for key in tokens[first:]:
            if len(key) > KEY_MAX_LENGTH:
                # memcached drops what it had gathered and answers with the error alone.
                return BAD_FORMAT
            if exptime is None:
                counters.cmd_get += 1
                item = store.get(key)
                if detail is not None:
                    detail.record_get(key, item is not None)
                if item is None:
                    counters.get_misses += 1
                    continue
                counters.get_hits += 1
            else:
                counters.cmd_touch += 1
                item = store.touch(key, exptime)
                if detail is not None:
                    detail.record_get(key, item is not None)
                if item is None:
                    counters.touch_misses += 1
                    continue
                counters.touch_hits += 1
            parts.append(fmt(key, item))
        if not parts:
            return END
        parts.append(END)
        return b"".join(parts)

    def _get_many(self, tokens: list[bytes], first: int) -> bytes:
        """Plain get of one or more keys: the multi-get path, kept free of per-key calls
        beyond the store lookup, with the counters added once at the end."""
        get = self.store.get
        detail = self.detail
        parts: list[bytes] = []
        hits = looked_up = 0
        reply = None
        for key in tokens[first:]:
            if len(key) > KEY_MAX_LENGTH:
                # memcached drops what it had gathered and answers with the error alone.
                reply = BAD_FORMAT
                break
            looked_up += 1
            item = get(key)
            if detail is not None:
                detail.record_get(key, item is not None)
            if item is not None:
                hits += 1
                parts += (b"VALUE ", key, item[HEADER_SIZE:])
        counters = self.counters
        counters.cmd_get += looked_up
        counters.get_hits += hits
        counters.get_misses += looked_up - hits
        if reply is not None:
            return reply
        if not parts:
            return END
        parts.append(END)
        return b"".join(parts)

    # -- storage -------------------------------------------------------------------------------

    def parse_storage(self, tokens: list[bytes]) -> StorageRequest | bytes:
        """Parse a storage command line: a request awaiting data, or an immediate reply."""
        command = tokens[0]
        if command == b"ms":
            return self.meta.parse_set(tokens)
        is_cas = command == b"cas"
        ntokens = len(tokens)
        if ntokens not in ((6, 7) if is_cas else (5, 6)):
            return ERROR
        noreply = tokens[-1] == NOREPLY
        key = tokens[1]
        if len(key) > KEY_MAX_LENGTH:
            return b"" if noreply else BAD_FORMAT
        flags = parse_u32(tokens[2])
        exptime = parse_i32(tokens[3])
        nbytes = parse_i32(tokens[4])
        if flags is None or exptime is None or nbytes is None:
            return b"" if noreply else BAD_FORMAT
        unique = 0
        if is_cas:
            parsed = parse_u64(tokens[5])
            if parsed is None:
                return b"" if noreply else BAD_FORMAT
            unique = parsed
        if not 0 <= nbytes <= I32_MAX - 2:
            # memcached refuses these lengths at once (above, it would wait for the data).
            return b"" if noreply else BAD_FORMAT
        if self.detail is not None:
            self.detail.record_set(key)
        request = StorageRequest(
            command, key, flags, self.absolute_exptime(exptime), nbytes, unique, noreply
        )
        if self.store.too_large(key, flags, nbytes):
            self.counters.store_too_large += 1
            if command == b"set":
                self.store.delete(key)  # never leave the stale value behind a failed set
            request.swallow = b"" if noreply else TOO_LARGE
        return request

    def complete_storage(self, request: StorageRequest, data: bytes, terminator: bytes) -> bytes:
        """Run a storage command once its data block (and the two bytes after it) arrived."""
        if request.meta is not None:
            return self.meta.complete_set(request, data, terminator)
        if request.swallow is not None:
            return request.swallow
        if terminator != b"\r\n":
            return b"" if request.noreply else BAD_DATA_CHUNK
        self.counters.cmd_set += 1
        store = self.store
        command = request.command
        key = request.key
        if command == b"set":
            outcome = store.set(key, request.flags, request.exptime, data)
        elif command == b"add":
            outcome = store.add(key, request.flags, request.exptime, data)
        elif command == b"replace":
            outcome = store.replace(key, request.flags, request.exptime, data)
        elif command == b"append":
            outcome = store.append(key, data)
        elif command == b"prepend":
            outcome = store.prepend(key, data)
        else:
            outcome = store.cas(key, request.flags, request.exptime, data, request.unique)
            if outcome is Outcome.STORED:
                self.counters.cas_hits += 1
            elif outcome is Outcome.EXISTS:
                self.counters.cas_badval += 1
            elif outcome is Outcome.NOT_FOUND:
                self.counters.cas_misses += 1
        if outcome is Outcome.NO_MEMORY:
            self.counters.store_no_memory += 1
        elif outcome is Outcome.TOO_LARGE:
            self.counters.store_too_large += 1
        return b"" if request.noreply else _OUTCOME_LINES[outcome]

    # -- other line commands -------------------------------------------------------------------

    def delete(self, tokens: list[bytes]) -> bytes:
        ntokens = len(tokens)
        if not 2 <= ntokens <= 4:
            return ERROR
        noreply = False
        if ntokens > 2:
            # Only "delete <key> 0", "delete <key> noreply" and "delete <key> 0 noreply".
            hold_is_zero = tokens[2] == b"0"
            noreply = tokens[-1] == NOREPLY
            valid = (ntokens == 3 and (hold_is_zero or noreply)) or (
                ntokens == 4 and hold_is_zero and noreply
            )
            if not valid:
                return b"" if noreply else DELETE_USAGE
        key = tokens[1]
        if len(key) > KEY_MAX_LENGTH:
            return b"" if noreply else BAD_FORMAT
        if self.detail is not None:
            self.detail.record_delete(key)
        if self.store.delete(key):
            self.counters.delete_hits += 1
            reply = DELETED
        else:
            self.counters.delete_misses += 1
            reply = NOT_FOUND
        return b"" if noreply else reply

    def incr(self, tokens: list[bytes]) -> bytes:
        return self._arith(tokens, incr=True)

    def decr(self, tokens: list[bytes]) -> bytes:
        return self._arith(tokens, incr=False)

    def _arith(self, tokens: list[bytes], incr: bool) -> bytes:
        if len(tokens) not in (3, 4):
            return ERROR
        noreply = tokens[-1] == NOREPLY
        key = tokens[1]
        if len(key) > KEY_MAX_LENGTH:
            return b"" if noreply else BAD_FORMAT
        delta = parse_u64(tokens[2])
        if delta is None:
            return b"" if noreply else BAD_DELTA
        result = self.store.incr(key, delta) if incr else self.store.decr(key, delta)
        counters = self.counters
        if result is Outcome.NOT_FOUND:
            if incr:
                counters.incr_misses += 1
            else:
                counters.decr_misses += 1
            reply = NOT_FOUND
        elif result is Outcome.NON_NUMERIC:
            reply = NON_NUMERIC
        else:
            if incr:
                counters.incr_hits += 1
            else:
                counters.decr_hits += 1
            reply = b"%d\r\n" % result
        return b"" if noreply else reply

    def touch(self, tokens: list[bytes]) -> bytes:
        if len(tokens) not in (3, 4):
            return ERROR
        noreply = tokens[-1] == NOREPLY
        key = tokens[1]
        if len(key) > KEY_MAX_LENGTH:
            return b"" if noreply else BAD_FORMAT
        exptime = parse_i32(tokens[2])
        if exptime is None:
            return b"" if noreply else BAD_EXPTIME
        self.counters.cmd_touch += 1
        if self.store.touch(key, self.absolute_exptime(exptime)) is None:
            self.counters.touch_misses += 1
            reply = NOT_FOUND
        else:
            self.counters.touch_hits += 1
            reply = TOUCHED
        return b"" if noreply else reply

    def flush_all(self, tokens: list[bytes]) -> bytes:
        ntokens = len(tokens)
        if ntokens > 3:
            return ERROR
        noreply = tokens[-1] == NOREPLY
        self.counters.cmd_flush += 1
        if not self.flush_enabled:  # -F; memcached still counts the attempt
            return b"" if noreply else FLUSH_DISABLED
        delay = 0
        if ntokens != (2 if noreply else 1):
            parsed = parse_i32(tokens[1])
            if parsed is None:
                return b"" if noreply else BAD_EXPTIME
            delay = parsed
        self.store.flush(self.absolute_exptime(delay) if delay > 0 else 0)
        return b"" if noreply else OK

    def version(self, tokens: list[bytes]) -> bytes:
        return self.version_line

    def verbosity_cmd(self, tokens: list[bytes]) -> bytes:
        if len(tokens) not in (2, 3):
            return ERROR
        noreply = tokens[-1] == NOREPLY
        level = parse_u32(tokens[1])
        if level is None:
            return b"" if noreply else BAD_FORMAT
        self.verbosity = min(level, 2)
        return b"" if noreply else OK

    def shutdown(self, tokens: list[bytes]) -> bytes | None:
        """With -A: stop the server (``shutdown graceful``: as SIGUSR1 does, keeping the cache
        with -e). None means "close this connection, no reply"."""
        if self.on_shutdown is None:
            return SHUTDOWN_DISABLED
        if len(tokens) == 1:
            self.on_shutdown(False)
            return None
        if len(tokens) == 2 and tokens[1] == b"graceful":
            self.on_shutdown(True)
            return None
        return SHUTDOWN_BAD_MODE

    def cache_memlimit(self, tokens: list[bytes]) -> bytes:
        """Resize the store (megabytes); a smaller size evicts down to it at once."""
        if len(tokens) not in (2, 3):
            return ERROR
        noreply = tokens[-1] == NOREPLY
        megabytes = parse_u32(tokens[1])
        if megabytes is None:
            reply = ERROR
        elif megabytes < 8:
            reply = MEMLIMIT_TOO_SMALL
        elif megabytes > 1_000_000_000:
            reply = MEMLIMIT_NOT_BYTES
        else:
            self.on_memlimit(megabytes * 1024 * 1024)
            reply = OK
        return b"" if noreply else reply

    def lru_crawler(self, tokens: list[bytes]) -> bytes:
        """``lru_crawler metadump <all|hash|classes>``: every live item's metadata, the
        listing key-dumping tools read. The crawler's other controls are not offered."""
        if len(tokens) == 3 and tokens[1] == b"metadump":
            if not self.dump_enabled:
                return METADUMP_DISABLED
            classes = parse_classes(tokens[2])
            if classes == set():
                return BAD_CLASS
            store = self.store
            return metadump(store.lru_items(), self.meta.slabs, classes, store.now())
        return ERROR

    def refresh_certs(self, tokens: list[bytes]) -> bytes:
        # As memcached: noreply silences the OK, never the error.
        if self._refresh_certs is None:
            return TLS_NOT_ENABLED
        error = self._refresh_certs()
        if error is not None:
            return f"{error}\r\n".encode("utf-8", "replace")
        return b"" if tokens[-1] == NOREPLY else OK

    def stats(self, tokens: list[bytes]) -> bytes:
        sub = tokens[1] if len(tokens) > 1 else b""
        if sub == b"detail":
            return self._stats_detail(tokens[2] if len(tokens) > 2 else b"")
        if sub == b"cachedump":
            return self._cachedump(tokens)
        if self._stats_report is None:
            return ERROR
        if sub == b"reset":
            self.prefix_stats.clear()
        report = self._stats_report(b" ".join(tokens[1:]))
        return ERROR if report is None else report

    def _stats_detail(self, what: bytes) -> bytes:
        if what == b"on":
            self.detail = self.prefix_stats
            return OK
        if what == b"off":
            self.detail = None
            return OK
        if what == b"dump":
            return self.prefix_stats.dump()
        return DETAIL_USAGE

    def _cachedump(self, tokens: list[bytes]) -> bytes:
        if not self.dump_enabled:
            return CACHEDUMP_DISABLED
        if len(tokens) < 4:
            return BAD_LINE
        clsid = parse_u32(tokens[2])
        limit = parse_u32(tokens[3])
        if clsid is None or limit is None:
            return BAD_FORMAT
        if clsid > 63:
            return ILLEGAL_SLAB
        return cachedump(self.store.lru_items(), self.meta.slabs, clsid, limit)
