"""Why the server stopped, in the file Kubernetes reads as the container's termination
message (`terminationMessagePath`, /dev/termination-log by default).

The kubelet creates that file for every container it starts and shows its contents in the
pod's status (`lastState.terminated.message`), where the operator picks it up for the
CacheCluster's conditions. Outside Kubernetes the file does not exist and nothing is
written: the server never creates it (as root it could, in /dev).
"""

from __future__ import annotations

import contextlib
import logging
import os

DEFAULT_PATH = "/dev/termination-log"
# The kubelet keeps at most 4096 bytes of a container's termination message.
MAX_BYTES = 4096

log = logging.getLogger("cacheserver")


def record_fatal(path: str, message: str) -> bool:
    """Write `message` as the termination message if the file exists and holds nothing yet
    (the first reason wins: a worker's own reason over its supervisor's "worker exited").
    True when it was written."""
    if not path:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return False  # not on Kubernetes, or no such file: the log has the reason anyway
    try:
        if os.fstat(fd).st_size:
            return False
        data = message.encode("utf-8", "replace")[:MAX_BYTES]
        os.write(fd, data)
        return True
    except OSError as exc:
        log.debug("cannot write the termination message to %s: %s", path, exc)
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
