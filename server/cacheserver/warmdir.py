"""``cacheserver-warm-dir``: prepare an appliance's warm-restart directory on the node.

Run by the operator's init container, as root with only the capabilities it needs, on the
node's tmpfs directory (a hostPath) that holds every appliance's snapshot in
``<namespace>/<cluster>/<pod>/``:

- creates the pod's directory and gives it to the server's user (uid 10001), since the
  kubelet creates hostPath directories as root;
- removes snapshots under the whole directory that are older than ``--max-age``: a snapshot
  is restored within seconds of its save or not at all (its pod was deleted, scaled away or
  moved to another node), and on tmpfs it holds node memory that no container's limit covers;
- removes the pod's own snapshot when it is not the latest of its appliance: the operator
  says on which node the appliance last ran ready (``--last-node``, from a pod annotation
  it sets when it lets the pod be scheduled), and a snapshot on any other node was saved
  before the appliance moved on and took writes elsewhere. Restoring it would serve values
  that have since been overwritten or deleted.
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
# What the operator's annotation says when it knows no node where the appliance ran ready
# (a first start, or a CacheCluster made anew under an old name): no snapshot is its own.
NO_NODE = "-"


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


def not_latest(node: str, last_node: str) -> str | None:
    """Why a snapshot of this pod's directory on ``node`` must not be restored, or None to
    keep it. ``last_node``: where the operator last saw the appliance ready (``NO_NODE``:
    nowhere; empty: the operator did not say, e.g. it could not read the CacheCluster or
    the pod was let go by someone else, and then the snapshot is kept as before)."""
    if not last_node:
        return None
    if last_node == NO_NODE:
        return "the operator knows no node where this appliance ran ready: it is not its own"
    if not node:
        return "this node's name is unknown, so it cannot be told from " + last_node
    if last_node != node:
        return (
            f"the appliance ran on {last_node} after this snapshot was saved here on {node}: "
            "its values may have changed since"
        )
    return None


def remove_snapshots(target: Path) -> list[Path]:
    """Remove the snapshot files in one pod's directory; returns them."""
    removed = []
    for path in sorted(target.iterdir()):
        if SNAPSHOT_NAME.match(path.name) and path.is_file():
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
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
    parser.add_argument("--node", default="", help="the node this runs on")
    parser.add_argument(
        "--last-node",
        default="",
        help=f"where the appliance last ran ready ({NO_NODE}: nowhere; empty: not said)",
    )
    args = parser.parse_args(argv)
    try:
        target = prepare(args.base, args.subdir, *args.owner)
    except (OSError, ValueError) as err:
        print(f"cacheserver-warm-dir: {err}", file=sys.stderr)
        sys.exit(1)
    why = not_latest(args.node, args.last_node)
    if why is not None:
        for path in remove_snapshots(target):
            print(f"removed snapshot {path.relative_to(args.base)}: {why}")
    for path in remove_stale(args.base, args.max_age):
        print(f"removed stale snapshot {path.relative_to(args.base)}")
    print(f"warm-restart directory {target.relative_to(args.base)} ready")


if __name__ == "__main__":
    main()
