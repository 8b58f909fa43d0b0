"""memcached's ``-Y`` credentials file: who may authenticate, reloaded when it changes.

The format is memcached 1.6's: one ``user:password`` per line; the user ends at the first
``:``, the password at the end of the line (a ``\\r`` before the ``\\n`` is not part of it,
so a file written on Windows works). A line without a ``:`` -- an empty line included --
makes the whole file malformed, as memcached says. Two deliberate differences, both about
files memcached would take and then serve badly: an empty file is refused (nobody could
ever authenticate), and there is no limit of 8 entries (memcached silently ignores the rest).

``parse_credentials`` is pure; ``CredentialsFile`` is what a worker serves: the timer calls
``poll()`` once a second (one stat()), SIGHUP calls ``reload()`` (memcached's way), and a file
that disappears or does not parse leaves the last good credentials in service.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cacheserver.security.files import Signature, signature

log = logging.getLogger("cacheserver")

# memcached reads each line into a 256-byte buffer; a longer one is refused here.
MAX_LINE = 255
MAX_FILE_BYTES = 1 << 20


class CredentialsError(ValueError):
    """A credentials file that cannot be served; the message names the file and the line."""


@dataclass(frozen=True)
class Credentials:
    entries: tuple[tuple[bytes, bytes], ...]

    def check(self, user: bytes, password: bytes) -> bool:
        """Whether this user and password are in the file (compared in constant time)."""
        found = False
        for known_user, known_password in self.entries:
            same_user = hmac.compare_digest(user, known_user)
            same_password = hmac.compare_digest(password, known_password)
            found |= same_user and same_password
        return found


def parse_credentials(data: bytes, path: str = "credentials file") -> Credentials:
    """The entries of a credentials file; CredentialsError naming the line if it is not one."""
    if not data:
        raise CredentialsError(f"{path} is empty: nobody could authenticate")
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    entries = []
    for number, line in enumerate(lines, 1):
        if len(line) > MAX_LINE:
            raise CredentialsError(f"{path}: line {number} is longer than {MAX_LINE} bytes")
        user, colon, rest = line.partition(b":")
        if not colon or b"\0" in user:
            raise CredentialsError(
                f"{path}: line {number} is not user:password (memcached's -Y format, "
                "one user:password per line, no empty lines)"
            )
        end = len(rest)
        for stop in (b"\r", b"\0"):
            at = rest.find(stop)
            if at >= 0:
                end = min(end, at)
        entries.append((user, rest[:end]))
    return Credentials(tuple(entries))


def read_credentials(path: str) -> Credentials:
    """Read and parse the file; OSError or CredentialsError with a message naming it."""
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise CredentialsError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    return parse_credentials(data, path)


class CredentialsFile:
    """The credentials one worker checks against, kept in step with the file."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self.credentials = read_credentials(path)  # a bad file at start stops the server
        self._signature: Signature | None = signature(path)
        self.loaded_at = clock()
        self.reloads = 0
        self.load_errors = 0
        self._failing = False

    def check(self, user: bytes, password: bytes) -> bool:
        return self.credentials.check(user, password)

    def poll(self) -> bool:
        """Reload the file if it changed since it was read; True when new entries serve."""
        now = signature(self.path)
        if now is None or now == self._signature:
            if now is None and not self._failing:
                self._failing = True
                self.load_errors += 1
                log.warning("credentials file %s is gone; the last entries still serve", self.path)
            return False
        return self.reload(now)

    def reload(self, sig: Signature | None = None) -> bool:
        """Read the file again (SIGHUP, or a change seen by poll()); keep the old entries if
        the new file cannot be read or parsed."""
        try:
            credentials = read_credentials(self.path)
        except (OSError, CredentialsError) as err:
            self._signature = sig if sig is not None else signature(self.path)
            self.load_errors += 1
            self._failing = True
            log.warning("credentials file not reloaded, the last entries still serve: %s", err)
            return False
        self._failing = False
        self._signature = sig if sig is not None else signature(self.path)
        self.credentials = credentials
        self.loaded_at = self._clock()
        self.reloads += 1
        log.info("credentials file %s: %d entries", self.path, len(credentials.entries))
        return True

    # -- what stats and /metrics show ---------------------------------------------------------

    def stats_fields(self) -> list[tuple[str, object]]:
        return [
            ("auth_file_entries", len(self.credentials.entries)),
            ("auth_file_reloads", self.reloads),
            ("auth_file_load_errors", self.load_errors),
            ("auth_file_age", int(max(0.0, self._clock() - self.loaded_at))),
        ]
