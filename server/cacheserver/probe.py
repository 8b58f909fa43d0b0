"""``cacheserver-probe``: a readiness/liveness probe that speaks the protocol.

Sends ``version`` and exits 0 only on a ``VERSION`` reply, so a pod is ready when the cache
answers, not merely when a port is open. With ``--admin-socket`` (or CACHESERVER_ADMIN_SOCKET)
it asks the worker's admin socket instead of its TCP port: that one answers ``version``
without -Y credentials and without TLS, which a probe inside the pod has neither of.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cacheserver-probe", description=__doc__)
    parser.add_argument("-l", "--listen", default=os.environ.get("CACHESERVER_LISTEN", "127.0.0.1"))
    parser.add_argument(
        "-p", "--port", type=int, default=int(os.environ.get("CACHESERVER_PORT", "11211"))
    )
    parser.add_argument(
        "--admin-socket",
        default=os.environ.get("CACHESERVER_ADMIN_SOCKET", ""),
        help="the worker's admin socket (its PATH.i with -t N)",
    )
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    # The first address of a -l list (its notls:/port parts do not matter for where it is).
    first = args.listen.split(",")[0].split(";")[0].removeprefix("notls:")
    host = first.rsplit(":", 1)[0] if first.count(":") == 1 else first.strip("[]")
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::", "*") else host
    where = args.admin_socket or f"{host}:{args.port}"
    try:
        if args.admin_socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(args.timeout)
            sock.connect(args.admin_socket)
        else:
            sock = socket.create_connection((host, args.port), timeout=args.timeout)
        with sock:
            sock.sendall(b"version\r\n")
            reply = b""
            while not reply.endswith(b"\r\n") and len(reply) < 256:
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
    except OSError as err:
        print(f"cacheserver-probe: {where}: {err}", file=sys.stderr)
        sys.exit(1)
    if not reply.startswith(b"VERSION "):
        print(f"cacheserver-probe: unexpected reply {reply[:80]!r}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
