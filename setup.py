"""The compiled parts: the store core (server/cacheserver/storage/core.c, the rules of items,
LRU, accounting, expiry and eviction, with _core.c its Python type), the server's fast path
(server/cacheserver/fastpath/*.c, one module, which compiles core.c in and calls it on the
Store it serves) and the warm-restart snapshot's block loops
(server/cacheserver/storage/_snapshotio.c, which takes its crc32 from zlib).

All three are required: the store core is the only definition of the store, so an install
without a C compiler fails here, loudly, rather than running something else.
"""

from pathlib import Path

from setuptools import Extension, setup

FASTPATH = Path("server/cacheserver/fastpath")
STORAGE = Path("server/cacheserver/storage")
FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(
    ext_modules=[
        Extension(
            "cacheserver.storage._core",
            sources=[str(STORAGE / "_core.c"), str(STORAGE / "core.c")],
            depends=[str(STORAGE / "core.h")],
            extra_compile_args=[*FLAGS, "-fvisibility=hidden"],
        ),
        Extension(
            "cacheserver.fastpath._fastpath",
            # core.c too: the store core's rules, called directly (and inlined) on the Store.
            sources=[*sorted(str(p) for p in FASTPATH.glob("*.c")), str(STORAGE / "core.c")],
            depends=[*sorted(str(p) for p in FASTPATH.glob("*.h")), str(STORAGE / "core.h")],
            include_dirs=[str(STORAGE)],
            extra_compile_args=[*FLAGS, "-fvisibility=hidden", "-flto"],
            extra_link_args=["-O2", "-flto"],
        ),
        Extension(
            "cacheserver.storage._snapshotio",
            sources=["server/cacheserver/storage/_snapshotio.c"],
            libraries=["z"],
            extra_compile_args=FLAGS,
        ),
    ]
)
