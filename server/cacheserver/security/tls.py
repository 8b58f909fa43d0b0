"""memcached's ``-Z`` TLS: the server's certificate, key and (for client certificates) CA,
with memcached's ``-o ssl_*`` options, reloaded without a restart.

``build_context`` turns the settings into an ``ssl.SSLContext`` or a ``TLSError`` whose message
is memcached's (``Error loading the certificate chain: FILE : reason`` and friends; the
reason is OpenSSL's as Python's ssl module words it). ``ServerTLS`` is what a worker serves:
new connections take ``context``; ``poll()`` (once a second, a stat() per file) and
``refresh()`` (the ``refresh_certs`` command, SIGHUP) build a new context from the files and
put it in service only if it loads, so a half-written or broken certificate never replaces a
good one. Connections already open keep the certificate they started with, as in memcached.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable

from cacheserver.config import Settings
from cacheserver.security.files import Signature, signature

log = logging.getLogger("cacheserver")

# ssl_verify_mode: what Python's ssl calls each, and the OpenSSL flags memcached reports in
# `stats settings` (PEER 1, FAIL_IF_NO_PEER_CERT 2, CLIENT_ONCE 4). Mode 3 differs from 2
# only on renegotiation, which is off.
VERIFY_MODES = {0: ssl.CERT_NONE, 1: ssl.CERT_OPTIONAL, 2: ssl.CERT_REQUIRED, 3: ssl.CERT_REQUIRED}
OPENSSL_VERIFY_FLAGS = {0: 0, 1: 1, 2: 3, 3: 7}
WBUF_SIZE = 16 * 1024  # memcached's ssl_wbuf_size, reported as it reports it


class TLSError(Exception):
    """Certificates that cannot serve; the message names the file, as memcached's does."""


def build_context(settings: Settings) -> ssl.SSLContext:
    """A server context from the ssl_* settings; TLSError naming what did not load."""
    chain, key, ca = settings.ssl_chain_cert, settings.ssl_key or None, settings.ssl_ca_cert
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # memcached's ssl_min_version default
    context.options |= ssl.OP_NO_RENEGOTIATION
    if settings.ssl_ciphers:
        try:
            context.set_ciphers(settings.ssl_ciphers)
        except ssl.SSLError as err:
            raise TLSError(f"Error setting the provided cipher(s): {settings.ssl_ciphers}") from err
    try:
        # The chain alone first, so that a bad chain and a bad key get their own message.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=chain)
    except (OSError, ssl.SSLError) as err:
        raise TLSError(f"Error loading the certificate chain: {chain} : {_reason(err)}") from err
    try:
        context.load_cert_chain(chain, key)
    except (OSError, ssl.SSLError) as err:
        if "KEY_VALUES_MISMATCH" in str(err):
            raise TLSError(f"Error validating the certificate: {_reason(err)}") from err
        raise TLSError(f"Error loading the key: {key or chain} : {_reason(err)}") from err
    if ca:
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as err:
            raise TLSError(f"Error loading the CA certificate: {ca} : {_reason(err)}") from err
    context.verify_mode = VERIFY_MODES[settings.ssl_verify_mode]
    return context


def _reason(err: Exception) -> str:
    if isinstance(err, OSError) and not isinstance(err, ssl.SSLError) and err.strerror:
        return err.strerror
    return str(err)


class ServerTLS:
    """The TLS context a worker gives new connections, kept in step with the files."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock
        self._files = tuple(
            path
            for path in (settings.ssl_chain_cert, settings.ssl_key, settings.ssl_ca_cert)
            if path
        )
        self.context = build_context(settings)  # bad files at start stop the server
        self._signature: Signature | None = signature(*self._files)
        self.refreshed_at = clock()
        self.reloads = 0
        self.load_errors = 0
        self.last_error = ""

    def poll(self) -> bool:
        """Reload when a file changed (the kubelet swapped the Secret's volume)."""
        now = signature(*self._files)
        if now is None or now == self._signature:
            return False
        return self.refresh(now) is None

    def refresh(self, sig: Signature | None = None) -> str | None:
        """Build a context from the files now; serve it if it loads. None when it does,
        else memcached's error text (the old certificates keep serving)."""
        self._signature = sig if sig is not None else signature(*self._files)
        try:
            context = build_context(self.settings)
        except TLSError as err:
            self.load_errors += 1
            self.last_error = str(err)
            log.warning("TLS certificates not reloaded, the last ones still serve: %s", err)
            return str(err)
        self.context = context
        self.refreshed_at = self._clock()
        self.reloads += 1
        self.last_error = ""
        log.info("TLS certificates reloaded from %s", ", ".join(self._files))
        return None

    # -- what stats and /metrics show ---------------------------------------------------------

    def stats_fields(self) -> list[tuple[str, object]]:
        return [
            ("time_since_server_cert_refresh", int(max(0.0, self._clock() - self.refreshed_at))),
            ("ssl_cert_reloads", self.reloads),
            ("ssl_cert_load_errors", self.load_errors),
        ]


def settings_fields(settings: Settings) -> list[tuple[str, object]]:
    """memcached's ssl_* lines of `stats settings`, written as memcached 1.6.18 writes them
    (it always has them, TLS on or off)."""
    st = settings
    return [
        ("ssl_enabled", "yes" if st.ssl_enabled else "no"),
        ("ssl_chain_cert", st.ssl_chain_cert or "(null)"),
        ("ssl_key", st.ssl_key or "(null)"),
        ("ssl_verify_mode", OPENSSL_VERIFY_FLAGS[st.ssl_verify_mode]),
        ("ssl_keyformat", 1),
        ("ssl_ciphers", st.ssl_ciphers or "NULL"),
        ("ssl_ca_cert", st.ssl_ca_cert or "NULL"),
        ("ssl_wbuf_size", WBUF_SIZE),
        ("ssl_session_cache", "no"),
        ("ssl_kernel_tls", "no"),
        ("ssl_min_version", "tlsv1.2"),
    ]
