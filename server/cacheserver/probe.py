"""``cacheserver-probe``: a readiness/liveness probe that speaks the protocol.

Sends ``version`` and exits 0 only on a ``VERSION`` reply, so a pod is ready when the cache
answers, not merely when a port is open.
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
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    host = "127.0.0.1" if args.listen in ("0.0.0.0", "", "::") else args.listen
    try:
        with socket.create_connection((host, args.port), timeout=args.timeout) as sock:
            sock.sendall(b"version\r\n")
            reply = b""
            while not reply.endswith(b"\r\n") and len(reply) < 256:
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
    except OSError as err:
        print(f"cacheserver-probe: {host}:{args.port}: {err}", file=sys.stderr)
        sys.exit(1)
    if not reply.startswith(b"VERSION "):
        print(f"cacheserver-probe: unexpected reply {reply[:80]!r}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
