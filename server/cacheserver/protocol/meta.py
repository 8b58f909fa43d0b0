"""memcached's meta protocol (mg, ms, md, ma, mn, me), replies byte-for-byte as memcached 1.6.18.

A meta request is the command, a key, and flags: single letters, some followed by a token
(``T30``, ``Oopaque``). ``parse_flags`` reads them as memcached's flag pre-parser does (the
same errors, in the same order); the ``Meta`` methods run a request against the store and
format its reply. Flags that return something (``k``, ``O``, ``c``, ``t``, ...) are answered
in the order the client gave them. ``q`` leaves out the reply that says all is well (``EN``
of a get miss, ``HD`` of a store or delete, ...) but never an error; ``mn`` answers ``MN`` so a
client knows a quiet batch is done.

Stale-while-revalidate: ``md <key> I`` marks an item stale instead of deleting it (with a new
CAS, and a new TTL with ``T``); the next ``mg`` of it sees ``X`` (stale) and ``W`` (you won:
recache it), later ones ``X`` and ``Z`` (someone else is recaching). ``ms ... I`` with an
older CAS stores the new value but keeps it marked stale. ``mg ... R<seconds>`` hands out the
same ``W`` token when an item's TTL drops below the given time, and ``mg ... N<seconds>``
creates an empty item on a miss (``W``: the caller fills it).

Where memcached 1.6.18 differs from the upstream protocol.txt, 1.6.18 is followed (see
docs/architecture.md): it has no ``E`` flag and no ``md x``; ``me`` prints ``exp=`` as the time
since the expiry (negative while the item lives).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import TYPE_CHECKING

from cacheserver.protocol.numbers import I32_MAX, parse_i32, parse_u32, parse_u64
from cacheserver.protocol.request import StorageRequest
from cacheserver.protocol.slabs import SlabClasses, item_total
from cacheserver.storage import Outcome
from cacheserver.storage.item import (
    FETCHED,
    KEY_BINARY,
    MARKS_AT,
    META_AT,
    STALE,
    TOKEN_SENT,
    item_cas,
    item_nbytes,
    unpack_header,
)

if TYPE_CHECKING:
    from cacheserver.metrics.counters import Counters
    from cacheserver.storage import Store

KEY_MAX_LENGTH = 250
# memcached's MFLAG_MAX_OPT_LENGTH counts the command, the key, the flags and its tokenizer's
# end marker: a request of this many words or more is refused.
MAX_WORDS = 20
MAX_OPAQUE_LENGTH = 32  # the O token, its letter included
U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1

ERROR = b"ERROR\r\n"
BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
BAD_DATA_CHUNK = b"CLIENT_ERROR bad data chunk\r\n"
BAD_TOKEN = b"CLIENT_ERROR bad token in command line format\r\n"
DUPLICATE_FLAG = b"CLIENT_ERROR duplicate flag\r\n"
INVALID_FLAG = b"CLIENT_ERROR invalid flag\r\n"
INVALID_OR_DUPLICATE = b"CLIENT_ERROR invalid or duplicate flag\r\n"
DECODING_KEY = b"CLIENT_ERROR error decoding key\r\n"
MODE_LENGTH = b"CLIENT_ERROR incorrect length for M token\r\n"
BAD_INITIAL = b"CLIENT_ERROR invalid numeric initial value\r\n"
BAD_DELTA = b"CLIENT_ERROR invalid numeric delta value\r\n"
OPAQUE_TOO_LONG = b"CLIENT_ERROR opaque token too long\r\n"
MG_TOO_LONG = b"CLIENT_ERROR options flags are too long\r\n"  # mg's wording
TOO_LONG = b"CLIENT_ERROR options flags too long\r\n"  # ms, md and ma's
MS_BAD_MODE = b"CLIENT_ERROR invalid mode for ms M token\r\n"
MA_BAD_MODE = b"CLIENT_ERROR invalid mode for ma M token\r\n"
NON_NUMERIC = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
NO_MEMORY = b"SERVER_ERROR out of memory storing object\r\n"
VIVIFY_NO_MEMORY = b"SERVER_ERROR Out of memory allocating new item\r\n"
MN = b"MN\r\n"
EN = b"EN\r\n"

_STATUS = {
    Outcome.STORED: b"HD",
    Outcome.NOT_STORED: b"NS",
    Outcome.EXISTS: b"EX",
    Outcome.NOT_FOUND: b"NF",
}
_SERVER_ERRORS = {Outcome.TOO_LARGE: TOO_LARGE, Outcome.NO_MEMORY: NO_MEMORY}

# ms modes (M<letter>): add, append, prepend, replace, set.
_MS_MODES = frozenset(b"EAPRS")

# memcached's base64 decoding table: the alphabet, and '=' (padding) as 0.
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64 = {c: i for i, c in enumerate(_ALPHABET)}
_B64[ord("=")] = 0


def decode_key(raw: bytes) -> bytes | None:
    """A base64 key as memcached decodes it (None where it fails): characters outside the
    alphabet are skipped, the rest must come in groups of four, and decoding stops after the
    first group with padding."""
    values = [(c, _B64[c]) for c in raw if c in _B64]
    if not values or len(values) % 4:
        return None
    out = bytearray()
    pad = 0
    for i in range(0, len(values), 4):
        block = values[i : i + 4]
        pad += sum(1 for c, _ in block if c == 61)
        a, b, c, d = (v for _, v in block)
        out += bytes(((a << 2 | b >> 4) & 0xFF, (b << 4 | c >> 2) & 0xFF, (c << 6 | d) & 0xFF))
        if pad:
            if pad > 2:
                return None
            del out[-pad:]
            break
    return bytes(out)


def encode_key(key: bytes, binary: bool) -> bytes:
    """The `` k<key>`` of a reply: a key that came base64-encoded goes back the same way."""
    if binary:
        return b" k" + base64.b64encode(key) + b" b"
    return b" k" + key


class MetaFlags:
    """The flags of one meta request, as memcached's pre-parser leaves them."""

    __slots__ = (
        "autoviv",
        "binary",
        "cas",
        "client_flags",
        "delta",
        "exptime",
        "has_cas",
        "initial",
        "key",
        "mode",
        "new_ttl",
        "no_reply",
        "no_update",
        "recache",
        "stale",
        "tokens",
        "value",
        "vivify",
    )

    def __init__(self, key: bytes, tokens: list[bytes]) -> None:
        self.key = key
        self.tokens = tokens  # the flags in the client's order
        self.binary = self.no_reply = self.no_update = self.vivify = self.value = False
        self.stale = self.has_cas = self.new_ttl = False
        self.autoviv = self.exptime = self.recache = 0
        self.cas = self.client_flags = self.initial = 0
        self.delta = 1
        self.mode = 0


def parse_flags(
    raw_key: bytes, tokens: list[bytes], absolute_exptime: Callable[[int], int]
) -> tuple[MetaFlags, bytes | None]:
    """Read the flags (memcached's _meta_flag_preparse). The second value is the error line
    to answer with, None when the flags are good, or ``b""`` for "the command's default"
    (a bad ``F`` sets no message of its own)."""
    flags = MetaFlags(raw_key, tokens)
    seen: set[int] = set()
    failed = False
    message: bytes | None = b""
    for token in tokens:
        letter = token[0]
        if letter >= 127 or letter in seen:
            return flags, DUPLICATE_FLAG
        seen.add(letter)
        if letter == 98:  # b: the key is base64
            decoded = decode_key(flags.key)
            if decoded is None:
                message, failed = DECODING_KEY, True
                flags.key = b""
            else:
                flags.key = decoded
            flags.binary = True
        elif letter in (78, 84, 82):  # N (vivify), T (TTL), R (recache below this TTL)
            seconds = parse_i32(token[1:])
            if seconds is None:
                message, failed = BAD_TOKEN, True
                continue
            when = absolute_exptime(seconds)
            if letter == 78:
                flags.vivify = True
                flags.autoviv = when
            elif letter == 84:
                flags.exptime = when
                flags.new_ttl = True
            else:
                flags.recache = when
        elif letter in b"OPLkstcflh":
            pass  # answered (or, for P and L, meant for a proxy) later
        elif letter == 118:  # v
            flags.value = True
        elif letter == 117:  # u
            flags.no_update = True
        elif letter == 113:  # q
            flags.no_reply = True
        elif letter == 70:  # F: client flags
            parsed = parse_u32(token[1:])
            if parsed is None:
                failed = True
            else:
                flags.client_flags = parsed
        elif letter == 67:  # C: compare CAS
            parsed = parse_u64(token[1:])
            if parsed is None:
                message, failed = BAD_TOKEN, True
            else:
                flags.cas = parsed
                flags.has_cas = True
        elif letter == 77:  # M: mode
            if len(token) != 2:
                message, failed = MODE_LENGTH, True
            else:
                flags.mode = token[1]
        elif letter == 74:  # J: initial value (ma)
            parsed = parse_u64(token[1:])
            if parsed is None:
                message, failed = BAD_INITIAL, True
            else:
                flags.initial = parsed
        elif letter == 68:  # D: delta (ma)
            parsed = parse_u64(token[1:])
            if parsed is None:
                message, failed = BAD_DELTA, True
            else:
                flags.delta = parsed
        elif letter == 73:  # I: invalidate (md), or store as stale (ms)
            flags.stale = True
        else:
            return flags, INVALID_FLAG
    return flags, message if failed else None


def _opaque(token: bytes) -> bytes | None:
    """`` O<opaque>`` as the reply echoes it, or None when it is too long."""
    return None if len(token) > MAX_OPAQUE_LENGTH else b" " + token


class Meta:
    """The meta commands for one worker, over the text protocol's store and counters."""

    def __init__(
        self, store: Store, counters: Counters, absolute_exptime: Callable[[int], int]
    ) -> None:
        self.store = store
        self.counters = counters
        self._absolute_exptime = absolute_exptime
        self.slabs = SlabClasses(store.max_item_size)

    def _flags(self, raw_key: bytes, tokens: list[bytes]) -> tuple[MetaFlags, bytes | None]:
        return parse_flags(raw_key, tokens, self._absolute_exptime)

    # -- mn, me ----------------------------------------------------------------------------------

    def mn(self, tokens: list[bytes]) -> bytes:
        return MN

    def me(self, tokens: list[bytes]) -> bytes:
        """Everything memcached knows about an item, in its own words (no LRU bump)."""
        if len(tokens) < 2 or len(tokens[1]) > KEY_MAX_LENGTH:
            return BAD_FORMAT
        key = tokens[1]
        if len(tokens) >= 3 and tokens[2] == b"b":
            decoded = decode_key(key)
            if decoded is None:
                return BAD_FORMAT
            key = decoded
        store = self.store
        item = store.peek(key)
        if item is None:
            return EN
        cas, exptime, flags, bumped, meta, marks = unpack_header(item)
        now = store.now()
        nbytes = item_nbytes(item)
        name = base64.b64encode(key) if marks & KEY_BINARY else key
        # memcached 1.6.18 prints now - exptime: the item's remaining life, negated.
        exp = -1 if exptime == 0 else _i32(now - exptime)
        return b"ME %s exp=%d la=%d cas=%d fetch=%s cls=%d size=%d\r\n" % (
            name,
            exp,
            (now - bumped) & U64,
            cas,
            b"yes" if meta & FETCHED else b"no",
            self.slabs.class_of_item(len(key), nbytes, flags),
            item_total(len(key), nbytes, flags),
        )

    # -- mg --------------------------------------------------------------------------------------

    def mg(self, tokens: list[bytes]) -> bytes:
        ntokens = len(tokens)
        if ntokens < 2:
            return ERROR
        if len(tokens[1]) > KEY_MAX_LENGTH:
            return BAD_FORMAT
        if ntokens >= MAX_WORDS:
            return MG_TOO_LONG
        flags, error = self._flags(tokens[1], tokens[2:])
        if error is not None:
            return error or BAD_FORMAT
        store = self.store
        counters = self.counters
        key = flags.key
        item = store.peek(key)
        created = False
        # A miss with N: an empty item, which this client is told to fill (W).
        if item is None and flags.vivify and store.add(key, 0, 0, b"") is Outcome.STORED:
            item = store.peek(key)
            created = item is not None
        if item is None:
            counters.cmd_get += 1
            counters.get_misses += 1
            parts = [b"EN"]
            for token in flags.tokens:
                letter = token[0]
                if letter == 79:  # O
                    opaque = _opaque(token)
                    if opaque is None:
                        return OPAQUE_TOO_LONG
                    parts.append(opaque)
                elif letter == 107:  # k
                    parts.append(encode_key(key, flags.binary))
            if flags.no_reply:
                return b""
            parts.append(b"\r\n")
            return b"".join(parts)

        cas, exptime, client_flags, bumped, meta, marks = unpack_header(item)
        old_exptime = exptime
        nbytes = item_nbytes(item)
        now = store.now()
        won = touched = False
        parts = [b"VA %d" % nbytes if flags.value else b"HD"]
        for token in flags.tokens:
            letter = token[0]
            if letter == 84:  # T: a new TTL (a touch)
                touched = True
                exptime = flags.exptime
            elif letter == 78:  # N: the item this request created gets the vivify TTL
                if created:
                    exptime = flags.autoviv
                    won = True
            elif letter == 82:  # R: win the recache token when the TTL is below the given
                if (
                    not marks & TOKEN_SENT
                    and not created
                    and exptime != 0
                    and exptime < flags.recache
                ):
                    won = True
            elif letter == 115:  # s
                parts.append(b" s%d" % nbytes)
            elif letter == 116:  # t: seconds left (-1: never expires)
                parts.append(b" t-1" if exptime == 0 else b" t%d" % ((exptime - now) & U32))
            elif letter == 99:  # c
                parts.append(b" c%d" % cas)
            elif letter == 102:  # f
                parts.append(b" f%d" % client_flags)
            elif letter == 108:  # l: seconds since the last access
                parts.append(b" l%d" % ((now - bumped) & U32))
            elif letter == 104:  # h: hit before
                parts.append(b" h1" if meta & FETCHED else b" h0")
            elif letter == 79:  # O
                opaque = _opaque(token)
                if opaque is None:
                    # memcached has already applied the TTL flags seen so far.
                    if exptime != old_exptime:
                        store.amend(key, item, exptime=exptime)
                    return OPAQUE_TOO_LONG
                parts.append(opaque)
            elif letter == 107:  # k
                parts.append(encode_key(key, bool(marks & KEY_BINARY)))
        if marks & TOKEN_SENT:
            parts.append(b" Z")  # another client won the token already
        if marks & STALE:
            parts.append(b" X")
            if not marks & TOKEN_SENT:
                won = True
        if won:
            parts.append(b" W")
            marks |= TOKEN_SENT
        parts.append(b"\r\n")
        if flags.value:
            parts.append(item[item[META_AT] & 0x7F :])
        if touched:
            counters.cmd_touch += 1
            counters.touch_hits += 1
        else:
            counters.cmd_get += 1
            counters.get_hits += 1
        if exptime != old_exptime or won or not flags.no_update:
            store.amend(key, item, exptime=exptime, marks=marks, hit=not flags.no_update)
        return b"".join(parts)

    # -- md --------------------------------------------------------------------------------------

    def md(self, tokens: list[bytes]) -> bytes:
        ntokens = len(tokens)
        if ntokens < 2:
            return ERROR
        if len(tokens[1]) > KEY_MAX_LENGTH:
            return BAD_FORMAT
        if ntokens >= MAX_WORDS:
            return TOO_LONG
        flags, error = self._flags(tokens[1], tokens[2:])
        if error is not None:
            return INVALID_OR_DUPLICATE
        key = flags.key
        echoed = []
        for token in flags.tokens:
            letter = token[0]
            if letter == 79:
                opaque = _opaque(token)
                if opaque is None:
                    return OPAQUE_TOO_LONG
                echoed.append(opaque)
            elif letter == 107:
                echoed.append(encode_key(key, flags.binary))
        store = self.store
        counters = self.counters
        item = store.peek(key)
        if item is None:
            counters.delete_misses += 1
            status = b"NF"
        elif flags.has_cas and item_cas(item) != flags.cas:
            counters.delete_misses += 1
            status = b"EX"
        else:
            if flags.stale:
                # Invalidate: keep the item, marked stale, so that the next mg hands out a
                # recache token (W) while others still get the old value (X).
                marks = (item[MARKS_AT] | STALE) & ~TOKEN_SENT
                exptime = flags.exptime if flags.new_ttl else None
                store.amend(key, item, exptime=exptime, marks=marks, cas=store.next_cas())
            else:
                store.delete(key)
                counters.delete_hits += 1
            if flags.no_reply:
                return b""
            status = b"HD"
        return b"".join((status, *echoed, b"\r\n"))

    # -- ma --------------------------------------------------------------------------------------

    def ma(self, tokens: list[bytes]) -> bytes:
        ntokens = len(tokens)
        if ntokens < 2:
            return ERROR
        if len(tokens[1]) > KEY_MAX_LENGTH:
            return BAD_FORMAT
        if ntokens >= MAX_WORDS:
            return TOO_LONG
        flags, error = self._flags(tokens[1], tokens[2:])
        if error is not None:
            return INVALID_OR_DUPLICATE
        mode = flags.mode
        if mode in (0, 73, 43):  # none, I, +
            incr = True
        elif mode in (68, 45):  # D, -
            incr = False
        else:
            return MA_BAD_MODE
        store = self.store
        counters = self.counters
        key = flags.key
        old = store.peek(key)
        result = store.arith(key, flags.delta, incr, flags.cas)
        created = quiet = False
        item = None
        if isinstance(result, int):
            quiet = flags.no_reply
            digits = b"%d" % result
            item = store.peek(key)
            in_place = old is not None and len(digits) <= item_nbytes(old)
            if incr:
                counters.incr_hits += 1
            else:
                counters.decr_hits += 1
        elif result is Outcome.NON_NUMERIC:
            return NON_NUMERIC
        elif result is Outcome.EXISTS:
            status = b"EX"
        elif flags.vivify:
            digits = b"%d" % flags.initial
            outcome = store.add(key, 0, 0, digits)
            if outcome is not Outcome.STORED:
                return VIVIFY_NO_MEMORY
            item = store.peek(key)
            created = in_place = True
        else:
            if incr:
                counters.incr_misses += 1
            else:
                counters.decr_misses += 1
            status = b"NF"
        if item is None:
            parts = [status]
            for token in flags.tokens:
                letter = token[0]
                if letter == 79:
                    opaque = _opaque(token)
                    if opaque is None:
                        return OPAQUE_TOO_LONG
                    parts.append(opaque)
                elif letter == 107:
                    parts.append(encode_key(key, flags.binary))
            parts.append(b"\r\n")
            return b"".join(parts)

        cas, exptime, _, _, _, _ = unpack_header(item)
        old_exptime = exptime
        parts = [b"VA %d" % len(digits) if flags.value else b"HD"]
        error = None
        now = store.now()
        for token in flags.tokens:
            letter = token[0]
            if letter == 99:  # c
                parts.append(b" c%d" % cas)
            elif letter == 116:  # t
                parts.append(b" t-1" if exptime == 0 else b" t%d" % ((exptime - now) & U32))
            elif letter == 84:  # T
                exptime = flags.exptime
            elif letter == 78:  # N
                if created:
                    exptime = flags.autoviv
            elif letter == 79:
                opaque = _opaque(token)
                if opaque is None:
                    error = OPAQUE_TOO_LONG
                    break
                parts.append(opaque)
            elif letter == 107:
                parts.append(encode_key(key, flags.binary))
        # A number that no longer fit was stored as a new item: memcached then sets the TTL
        # on the old one, so the new TTL is lost (as in 1.6.18).
        if exptime != old_exptime and in_place:
            store.amend(key, item, exptime=exptime)
        if error is not None:
            return error
        if quiet:
            return b""
        if flags.value:
            parts += (b"\r\n", digits)
        parts.append(b"\r\n")
        return b"".join(parts)

    # -- ms --------------------------------------------------------------------------------------

    def parse_set(self, tokens: list[bytes]) -> StorageRequest | bytes:
        """An ms command line: a request awaiting its data block, or an immediate reply. Once
        the length is known, errors are answered after the data block, which is discarded."""
        ntokens = len(tokens)
        if ntokens < 2:
            return ERROR
        if len(tokens[1]) > KEY_MAX_LENGTH or ntokens == 2:
            return BAD_FORMAT
        if ntokens >= MAX_WORDS:
            return TOO_LONG
        nbytes = parse_i32(tokens[2])
        if nbytes is None or not 0 <= nbytes <= I32_MAX - 2:
            return BAD_FORMAT
        flags, error = self._flags(tokens[1], tokens[3:])
        request = StorageRequest(
            b"ms", flags.key, flags.client_flags, flags.exptime, nbytes, flags.cas, False
        )
        request.meta = flags
        if error is not None:
            request.swallow = error or BAD_FORMAT
            return request
        for token in flags.tokens:
            if token[0] == 79 and len(token) > MAX_OPAQUE_LENGTH:
                error = OPAQUE_TOO_LONG
        if flags.mode and flags.mode not in _MS_MODES:
            error = MS_BAD_MODE
        if error is not None:
            request.swallow = error
            return request
        store = self.store
        if store.too_large(flags.key, flags.client_flags, nbytes):
            self.counters.store_too_large += 1
            store.delete(flags.key)  # memcached never leaves the old value behind, any mode
            request.swallow = TOO_LARGE
        return request

    def complete_set(self, request: StorageRequest, data: bytes, terminator: bytes) -> bytes:
        """Run an ms once its data block arrived."""
        if request.swallow is not None:
            return request.swallow
        if terminator != b"\r\n":
            return BAD_DATA_CHUNK
        flags = request.meta
        assert flags is not None
        counters = self.counters
        counters.cmd_set += 1
        store = self.store
        key = request.key
        marks = KEY_BINARY if flags.binary else 0
        mode = flags.mode or 83  # S: set
        is_cas = flags.has_cas and mode in (83, 82)  # a CAS turns set and replace into cas
        if is_cas:
            outcome = store.cas(
                key, request.flags, request.exptime, data, request.unique, marks, flags.stale
            )
            if outcome is Outcome.STORED:
                counters.cas_hits += 1
            elif outcome is Outcome.EXISTS:
                counters.cas_badval += 1
            elif outcome is Outcome.NOT_FOUND:
                counters.cas_misses += 1
        elif mode == 83:
            outcome = store.set(key, request.flags, request.exptime, data, marks)
        elif mode == 69:  # E: add
            outcome = store.add(key, request.flags, request.exptime, data, marks)
        elif mode == 82:  # R: replace
            outcome = store.replace(key, request.flags, request.exptime, data, marks)
        elif mode == 65:  # A: append
            outcome = store.append(key, data, request.unique)
        else:  # P: prepend
            outcome = store.prepend(key, data, request.unique)
        if outcome is Outcome.TOO_LARGE and mode in (65, 80):
            outcome = Outcome.NOT_STORED  # memcached: an append that no longer fits
        error = _SERVER_ERRORS.get(outcome)
        if error is not None:
            if outcome is Outcome.NO_MEMORY:
                counters.store_no_memory += 1
            else:
                counters.store_too_large += 1
            return error
        if outcome is Outcome.STORED and flags.no_reply:
            return b""
        parts = [_STATUS[outcome]]
        for token in flags.tokens:
            letter = token[0]
            if letter == 79:
                parts.append(b" " + token)
            elif letter == 107:
                parts.append(encode_key(key, flags.binary))
            elif letter == 99:
                parts.append(b" c%d" % (store.last_cas if outcome is Outcome.STORED else 0))
        parts.append(b"\r\n")
        return b"".join(parts)


def _i32(value: int) -> int:
    """``value`` as C's int32 arithmetic leaves it."""
    value &= U32
    return value - (1 << 32) if value >= 1 << 31 else value
