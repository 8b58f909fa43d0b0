"""Instructions per request of the compiled fast path, by request shape, counted by callgrind.

Time on a shared 2-CPU machine moves by several percent from run to run; instruction
counts do not. Each shape (a get hit, a miss, a set, an mg with every flag...) is 2,000
requests in one ``Engine.run`` over a store that holds their keys, counted inside
``Engine.run`` only (what the C code and the store core it calls execute, setup left out).
With ``--baseline`` the same shapes run on another checkout's server/ as well, side by side.

Usage: python bench/instructions.py [--baseline OTHER/server] [--only get,set]
Needs valgrind (Debian's ``valgrind``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SERVER = Path(__file__).resolve().parent.parent / "server"  # this checkout's
REQUESTS = 2000
VALUE = b"v" * 100
SHAPES: dict[str, bytes] = {
    # name: one request, with {k} for its key. Every key is stored and read once beforehand,
    # so a hit finds its item fetched and recently moved, as in a warm cache; "first hit"
    # is a key stored but never read (the hit marks it fetched and moves it).
    "get hit": b"get {k}\r\n",
    "get first hit": b"get f{k}\r\n",
    "get miss": b"get x{k}\r\n",
    "gets hit": b"gets {k}\r\n",
    "mg v hit": b"mg {k} v\r\n",
    "mg v q miss": b"mg x{k} v q\r\n",
    "mg 9 flags": b"mg {k} v k s f t c h l\r\n",
    "ms replace": b"ms {k} 100 T0\r\n" + VALUE + b"\r\n",
    "set replace": b"set {k} 0 0 100\r\n" + VALUE + b"\r\n",
    "set new key": b"set n{k} 0 0 100\r\n" + VALUE + b"\r\n",
}

# Run in the measured interpreter.
CHILD = """
from cacheserver.fastpath import make_engine
from cacheserver.metrics.counters import Counters
from cacheserver.metrics.latency import LatencyHistogram
from cacheserver.storage import Store
template, n, value = {template!r}, {n}, {value!r}
store = Store(1 << 30, clock=lambda: 1_000_000.0)
keys = [b"key:%08d" % i for i in range(n)]
for key in keys:
    store.set(key, 0, 0, value)
    store.get(key)
    store.set(b"f" + key, 0, 0, value)
engine = make_engine(store, Counters(), LatencyHistogram())
data = b"".join(template.replace(b"{{k}}", key) for key in keys)
replies, done = engine.run(data)
assert done == len(data), (done, len(data))
"""


def count(source: Path, template: bytes) -> float:
    """Instructions per request inside Engine.run for this shape, on ``source``'s server."""
    # A fixed hash seed: the dict's probes, and so the count, are the same in every run.
    env = {**os.environ, "PYTHONPATH": str(source), "PYTHONHASHSEED": "0"}
    with tempfile.TemporaryDirectory(prefix="instructions-") as scratch:
        out = Path(scratch) / "callgrind.out"
        code = CHILD.format(template=template, n=REQUESTS, value=VALUE)
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--toggle-collect=*Engine_run*",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-c",
            code,
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            sys.exit(f"instructions.py: the run failed:\n{done.stderr[-2000:]}")
        totals = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
        assert totals, "callgrind wrote no totals"
        return int(totals.group(1)) / REQUESTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="another checkout's server/ dir")
    parser.add_argument("--only", help="comma-separated shape names (default: all)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("instructions.py: valgrind not found (apt-get install valgrind)")
    shapes = SHAPES if not args.only else {k: SHAPES[k] for k in args.only.split(",")}
    head = "| shape | instructions per request |"
    rule = "|---|---:|"
    if args.baseline:
        head = "| shape | this tree | baseline | ratio |"
        rule = "|---|---:|---:|---:|"
    print(head)
    print(rule)
    for name, template in shapes.items():
        mine = count(SERVER, template)
        if args.baseline:
            base = count(args.baseline, template)
            print(f"| {name} | {mine:,.0f} | {base:,.0f} | {mine / base:.3f} |")
        else:
            print(f"| {name} | {mine:,.0f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
