"""Number parsing with memcached's rules (its safe_strto* helpers around strtol/strtoull).

Accepted: leading whitespace, an optional sign, decimal digits, and then either the end or
whitespace. Python's ``int()`` would also take underscores and trailing junk rules of its own,
so the slow path is written out. Where memcached silently truncates a 64-bit parse to 32 bits
(flags, exptime, byte counts) this server refuses the number instead: a clear error beats a
value that is quietly changed (listed in docs/architecture.md under known differences).
"""

from __future__ import annotations

_SPACE = b" \t\n\v\f\r"
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
I32_MIN = -(1 << 31)
I32_MAX = (1 << 31) - 1


def _parse(token: bytes) -> int | None:
    """strtol-style parse: the integer at the start of ``token``, or None if malformed."""
    text = token.lstrip(_SPACE)
    sign = 1
    if text[:1] in (b"+", b"-"):
        sign = -1 if text[:1] == b"-" else 1
        text = text[1:]
    end = 0
    n = len(text)
    while end < n and 48 <= text[end] <= 57:
        end += 1
    if end == 0 or (end < n and text[end] not in _SPACE):
        return None
    return sign * int(text[:end])


def _parse_unsigned(token: bytes, maximum: int) -> int | None:
    if token.isdigit():
        value = int(token)
    else:
        value = _parse(token)
        if value is None or value < 0:
            return None
    return value if value <= maximum else None


def parse_u32(token: bytes) -> int | None:
    return _parse_unsigned(token, U32_MAX)


def parse_i32(token: bytes) -> int | None:
    value = int(token) if token.isdigit() else _parse(token)
    if value is None or not I32_MIN <= value <= I32_MAX:
        return None
    return value


def parse_u64(token: bytes) -> int | None:
    return _parse_unsigned(token, U64_MAX)
