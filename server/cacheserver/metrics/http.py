"""A minimal HTTP endpoint on the worker's own event loop (no extra thread): Prometheus'
/metrics, and /stats and /stats/settings with memcached's ``stats`` and ``stats settings``
replies as text. The latter are for the operator, which reads what each appliance reports
about itself (its CPUs, its memory limit, its warm restart) and may not be able to speak to
the memcached port: with -Y it has no credentials, with TLS alone no client certificate.
Nothing here reads or writes items; ``?worker=N`` picks a worker of a -t N server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

# (worker, "" or "settings") -> memcached's reply, or None when that worker does not answer.
StatsSource = Callable[[int, str], "bytes | None"]
STATS_PATHS = {b"/stats": "", b"/stats/settings": "settings"}


async def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, stats: StatsSource | None = None
) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            target = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            path, _, query = target.partition(b"?")
            status, content_type, body = "200 OK", CONTENT_TYPE_LATEST, b""
            if path in (b"/metrics", b"/"):
                body = generate_latest(registry)
            elif path in STATS_PATHS and stats is not None:
                content_type = "text/plain; charset=utf-8"
                worker = parse_qs(query.decode("latin-1")).get("worker", ["0"])[0]
                reply = stats(int(worker), STATS_PATHS[path]) if worker.isdigit() else None
                if reply is None:
                    status, body = "404 Not Found", b"no such worker\n"
                else:
                    body = reply
            else:
                status, content_type, body = "404 Not Found", "text/plain", b"not found\n"
            head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_address=True)
