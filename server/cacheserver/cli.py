"""``cacheserver``: command line like memcached's; every flag can also come from the
environment (CACHESERVER_<NAME>) so a pod spec can set it without a shell."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cacheserver import __version__
from cacheserver.config import DEFAULT_PORT, Settings, parse_size
from cacheserver.termination import DEFAULT_PATH as TERMINATION_LOG
from cacheserver.termination import record_fatal

ENV_PREFIX = "CACHESERVER_"

DESCRIPTION = """\
cacheserver: a memcached-compatible cache server (text protocol over TCP and UDP).
Every option can also be set with an environment variable, shown in brackets; a flag given
on the command line wins over the environment."""

EPILOG = """\
UDP is off by default (-U 0), as in memcached since 1.5.6: an open UDP port on a cache can be
abused for reflection and amplification attacks. When it is on, only the get/set family of
commands is answered over UDP unless --udp-allow-all is given.

-l takes memcached's list: addresses separated by commas, each ADDR, ADDR:PORT, [IPV6]:PORT or
* (every interface). With -Z every listener speaks TLS except those written notls:ADDR[:PORT],
e.g. -Z -l 10.0.0.5,notls:10.0.0.5:11212 for TLS on -p's port and plaintext on 11212.

-o takes memcached's TLS options, comma-separated: ssl_chain_cert=FILE, ssl_key=FILE,
ssl_ca_cert=FILE, ssl_verify_mode=0|1|2|3 (none, request, require, once), ssl_ciphers=LIST.
The certificate files and the -Y credentials file are read again when they change (and on
SIGHUP); refresh_certs reloads the certificates at once."""

# memcached's -o options this server takes, and the setting each one sets.
EXTENDED = {
    "ssl_chain_cert": "ssl_chain_cert",
    "ssl_key": "ssl_key",
    "ssl_ca_cert": "ssl_ca_cert",
    "ssl_verify_mode": "ssl_verify_mode",
    "ssl_ciphers": "ssl_ciphers",
}


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def _port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a port (0-65535)")
    return value


def _positive(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise ValueError(f"{value} must be at least 1")
    return value


def _non_negative(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise ValueError(f"{value} must not be negative")
    return value


def _memory(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    return _positive(text)


def _item_size(text: str) -> int:
    value = parse_size(text)
    if not 1024 <= value <= 1024**3:
        raise ValueError(f"{text} is outside 1k..1g")
    return value


def _verify_mode(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 3:
        raise ValueError(f"{value} is not 0 (none), 1 (request), 2 (require) or 3 (once)")
    return value


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def _typed(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"invalid {what}: {err}") from None

    convert.__name__ = what
    return convert


# (flags, settings field, env name, parser, default, help)
_OPTIONS: list[tuple[tuple[str, ...], str, Callable[[str], Any], Any, str]] = [
    (("-p", "--port"), "port", _port, DEFAULT_PORT, "TCP port to listen on"),
    (("-U", "--udp-port"), "udp_port", _port, 0, "UDP port to listen on, 0 is off"),
    (
        ("-l", "--listen"),
        "listen",
        str,
        "0.0.0.0",
        "interfaces to listen on, memcached's list (below); repeated -l add up",
    ),
    (
        ("-m", "--memory-limit"),
        "memory_limit_mb",
        _memory,
        None,
        "item memory in megabytes, or 'auto' to size from the cgroup limit",
    ),
    (
        ("--memory-headroom",),
        "memory_headroom_mb",
        _non_negative,
        None,
        "megabytes kept free under the memory limit with -m auto",
    ),
    (("-c", "--conn-limit"), "conn_limit", _positive, 1024, "max simultaneous connections"),
    (
        ("-I", "--max-item-size"),
        "max_item_size",
        _item_size,
        1024 * 1024,
        "max item size, with k or m suffix",
    ),
    (("--metrics-port",), "metrics_port", _port, 0, "Prometheus /metrics port, 0 is off"),
    (
        ("--idle-timeout",),
        "idle_timeout",
        _non_negative,
        0,
        "close connections idle this many seconds, 0 is never",
    ),
    (("-t", "--workers"), "workers", _positive, 1, "worker processes (one shard each)"),
    (("--pin",), "pin", _flag, False, "pin each worker to one CPU of this process's cpuset"),
    (
        ("--udp-allow-all",),
        "udp_allow_all",
        _flag,
        False,
        "answer every command over UDP, not only the get/set family",
    ),
    (
        ("-e", "--memory-file"),
        "memory_file",
        str,
        "",
        "warm restart: save the items to this file (on tmpfs) on SIGTERM or SIGUSR1 and "
        "restore them from it at start; with -t N, worker i uses FILE.i",
    ),
    (
        ("-F", "--disable-flush-all"),
        "disable_flush_all",
        _flag,
        False,
        "refuse flush_all (CLIENT_ERROR flush_all not allowed), as memcached's -F",
    ),
    (
        ("-A", "--enable-shutdown"),
        "enable_shutdown",
        _flag,
        False,
        "let the shutdown command stop the server (shutdown graceful: as SIGUSR1)",
    ),
    (
        ("-X", "--disable-dumping"),
        "disable_dumping",
        _flag,
        False,
        "refuse stats cachedump and lru_crawler metadump, as memcached's -X",
    ),
    (
        ("--python-only",),
        "python_only",
        _flag,
        False,
        "serve every request in Python, without the compiled fast path for get and set",
    ),
    (
        ("--cluster-config",),
        "cluster_config",
        str,
        None,
        "answer ElastiCache's auto discovery (config get cluster, over TCP) with the cluster "
        "membership in this JSON file, reloaded when it changes (the operator mounts it)",
    ),
    (
        ("-Y", "--auth-file"),
        "auth_file",
        str,
        "",
        "memcached's text-protocol authentication: user:password lines; a client sends "
        "'set <any key> 0 0 <bytes>' with '<user> <password>' as data first (UDP must be off)",
    ),
    (("-Z", "--enable-ssl"), "ssl_enabled", _flag, False, "TLS on every -l listener but notls:"),
    (("--ssl-chain-cert",), "ssl_chain_cert", str, "", "TLS: certificate chain, PEM (-o)"),
    (("--ssl-key",), "ssl_key", str, "", "TLS: private key, PEM, if not in the chain file (-o)"),
    (
        ("--ssl-ca-cert",),
        "ssl_ca_cert",
        str,
        "",
        "TLS: CA certificates, PEM, that client certificates must chain to (-o)",
    ),
    (
        ("--ssl-verify-mode",),
        "ssl_verify_mode",
        _verify_mode,
        0,
        "TLS: client certificates, 0 not asked, 1 checked if sent, 2 and 3 required (-o)",
    ),
    (("--ssl-ciphers",), "ssl_ciphers", str, "", "TLS: OpenSSL cipher list for TLS 1.2 (-o)"),
    (
        ("--admin-socket",),
        "admin_socket",
        str,
        "",
        "a Unix socket that answers version and stats only, without -Y or TLS (for the "
        "probe and the supervisor of -t N; worker i uses PATH.i)",
    ),
    (
        ("--termination-log",),
        "termination_log",
        str,
        TERMINATION_LOG,
        "file that gets the reason of a fatal stop, if it exists (Kubernetes' termination message)",
    ),
]


_METAVARS = {
    "port": "NUM",
    "udp_port": "NUM",
    "listen": "ADDR",
    "memory_limit_mb": "MB|auto",
    "memory_headroom_mb": "MB",
    "conn_limit": "NUM",
    "max_item_size": "SIZE",
    "metrics_port": "NUM",
    "idle_timeout": "SECONDS",
    "workers": "NUM",
    "cluster_config": "PATH",
    "termination_log": "PATH",
    "memory_file": "FILE",
    "auth_file": "FILE",
    "ssl_chain_cert": "FILE",
    "ssl_key": "FILE",
    "ssl_ca_cert": "FILE",
    "ssl_verify_mode": "MODE",
    "ssl_ciphers": "LIST",
    "admin_socket": "PATH",
}


def _env_name(field: str) -> str:
    names = {"memory_limit_mb": "MEMORY_LIMIT", "memory_headroom_mb": "MEMORY_HEADROOM"}
    return ENV_PREFIX + names.get(field, field.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cacheserver",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flags, field, parse, default, help_text in _OPTIONS:
        env = _env_name(field)
        shown = "auto" if field == "memory_limit_mb" and default is None else default
        suffix = f" [{env}]" + (f" (default: {shown})" if shown not in (None, False, "") else "")
        if parse is _flag:
            parser.add_argument(
                *flags,
                dest=field,
                nargs="?",
                const=True,
                default=None,
                type=_typed(parse, field),
                help=help_text + suffix,
            )
        else:
            parser.add_argument(
                *flags,
                dest=field,
                default=None,
                type=_typed(parse, field),
                metavar=_METAVARS[field],
                help=help_text + suffix,
                # -l may be given more than once, as in memcached: the lists add up.
                **({"action": "append"} if field == "listen" else {}),
            )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=None,
        help=f"verbose logging; -vv for more [{ENV_PREFIX}VERBOSE]",
    )
    parser.add_argument(
        "-o",
        "--extended",
        action="append",
        default=[],
        metavar="OPT=VALUE,...",
        help="memcached's extended options; the ssl_* ones (see below)",
    )
    parser.add_argument("-V", "--version", action="version", version=f"cacheserver {__version__}")
    return parser


def _extended(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, Any]:
    """memcached's -o: comma-separated NAME=VALUE, the TLS ones as the flags of the same name."""
    parses = {field: parse for _flags, field, parse, _default, _help in _OPTIONS}
    values: dict[str, Any] = {}
    for item in items:
        for part in item.split(","):
            name, eq, text = part.strip().partition("=")
            field = EXTENDED.get(name)
            if field is None:
                known = ", ".join(EXTENDED)
                parser.error(f"-o {name}: not an option this server takes ({known})")
            if not eq or not text:
                parser.error(f"-o {name}: needs a value ({name}=...)")
            try:
                values[field] = parses[field](text)
            except ValueError as err:
                parser.error(f"-o {name}: {err}")
    return values


def parse_settings(argv: Sequence[str] | None, environ: dict[str, str] | None = None) -> Settings:
    """Flags first, then CACHESERVER_* variables, then defaults. Exits with a clear message."""
    env = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    extended = _extended(parser, args.extended)
    values: dict[str, Any] = {}
    if args.listen is not None:
        args.listen = ",".join(args.listen)
    for _flags, field, parse, default, _help in _OPTIONS:
        value = getattr(args, field)
        if value is None:
            value = extended.get(field)
        if value is None:
            name = _env_name(field)
            if name in env:
                try:
                    value = parse(env[name])
                except ValueError as err:
                    parser.error(f"environment variable {name}: {err}")
            else:
                value = default
        values[field] = value
    verbose = args.verbose
    if verbose is None:
        raw = env.get(ENV_PREFIX + "VERBOSE", "0")
        try:
            verbose = _non_negative(raw)
        except ValueError as err:
            parser.error(f"environment variable {ENV_PREFIX}VERBOSE: {err}")
    values["verbose"] = verbose
    settings = Settings(**values)
    if (
        settings.memory_limit_mb is not None
        and settings.max_item_size > settings.memory_limit_mb * 1024 * 1024
    ):
        parser.error("-I/--max-item-size cannot be larger than -m/--memory-limit")
    try:
        settings.listeners  # noqa: B018 -- parsed here so a bad -l stops the server at once
    except ValueError as err:
        parser.error(f"-l/--listen: {err}")
    if settings.auth_file and settings.udp_port:
        # memcached's own refusal: UDP cannot carry the authentication exchange.
        parser.error("Cannot use UDP with ascii authentication enabled (-U 0 to disable)")
    if settings.ssl_enabled and not settings.ssl_chain_cert:
        parser.error("-Z needs a certificate: -o ssl_chain_cert=FILE (and ssl_key=FILE)")
    tls_files = (settings.ssl_chain_cert, settings.ssl_key, settings.ssl_ca_cert)
    if not settings.ssl_enabled and any(tls_files):
        parser.error("the ssl_* options need -Z (TLS is off)")
    return settings


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=logging.DEBUG if settings.verbose > 1 else logging.INFO,
        format="%(asctime)s cacheserver[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    from cacheserver.app import run

    try:
        code = run(settings)
    except Exception as exc:
        record_fatal(settings.termination_log, f"crashed: {type(exc).__name__}: {exc}")
        raise
    sys.exit(code)
