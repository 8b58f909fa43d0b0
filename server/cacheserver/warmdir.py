"""``cacheserver-warm-dir``: prepare an appliance's warm-restart directory on the node.

Run by the operator's init container, as root with only the capabilities it needs, on the
node's tmpfs directory (a hostPath) that holds every appliance's snapshot in
``<namespace>/<cluster>/<pod>/``:

- creates the pod's directory and gives it to the server's user (uid 10001), since the
  kubelet creates hostPath directories as root;
- removes snapshots under the whole directory that are older than ``--max-age``: a snapshot
  is restored within seconds of its save or not at all (its pod was deleted, scaled away or
  moved to another node), and on tmpfs it holds node memory that no container's limit covers.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

# What cacheserver.warm writes: the file, one per worker (.i), and a save that was cut short.
SNAPSHOT_NAME = re.compile(r"^snapshot(\.\d+)?(\.partial)?$")
DEPTH = 3  # <namespace>/<cluster>/<pod>


def prepare(base: Path, subdir: str, uid: int, gid: int) -> Path:
    """Create ``base/subdir`` (the last part owned by uid:gid, mode 0700); returns it."""
    parts = Path(subdir).parts
    if len(parts) != DEPTH or any(p in ("..", ".", "") or "/" in p for p in parts):
        raise ValueError(f"{subdir!r} is not <namespace>/<cluster>/<pod>")
    target = base.joinpath(*parts)
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    target.mkdir(mode=0o700, exist_ok=True)
    os.chown(target, uid, gid)
    os.chmod(target, 0o700)
    return target


def remove_stale(base: Path, max_age: float, now: float | None = None) -> list[Path]:
    """Remove snapshots older than ``max_age`` seconds under ``base``; returns them."""
    now = time.time() if now is None else now
    removed = []
    for path in sorted(base.glob("/".join(["*"] * (DEPTH + 1)))):
        if not SNAPSHOT_NAME.match(path.name) or not path.is_file():
            continue
        try:
            if now - path.stat().st_mtime > max_age:
                path.unlink()
                removed.append(path)
        except OSError:  # gone meanwhile (another pod's init on this node)
            continue
    return removed


def _owner(text: str) -> tuple[int, int]:
    uid, _, gid = text.partition(":")
    return int(uid), int(gid or uid)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cacheserver-warm-dir", description=__doc__)
    parser.add_argument("base", type=Path, help="the node directory (hostPath) mounted here")
    parser.add_argument("subdir", help="<namespace>/<cluster>/<pod>")
    parser.add_argument("--owner", type=_owner, default=(10001, 10001), help="UID[:GID]")
    parser.add_argument("--max-age", type=float, default=900.0, help="seconds (default 900)")
    args = parser.parse_args(argv)
    try:
        target = prepare(args.base, args.subdir, *args.owner)
    except (OSError, ValueError) as err:
        print(f"cacheserver-warm-dir: {err}", file=sys.stderr)
        sys.exit(1)
    for path in remove_stale(args.base, args.max_age):
        print(f"removed stale snapshot {path.relative_to(args.base)}")
    print(f"warm-restart directory {target.relative_to(args.base)} ready")


if __name__ == "__main__":
    main()
