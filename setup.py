"""The compiled parts: the server's fast path (server/cacheserver/fastpath/*.c, one module)
and the warm-restart snapshot's block loops (server/cacheserver/storage/_snapshotio.c,
which takes its crc32 from zlib).

optional=True: where no C compiler (or no zlib.h) is at hand the install still succeeds and
the server runs its Python path (docs/architecture.md).
"""

from pathlib import Path

from setuptools import Extension, setup

FASTPATH = Path("server/cacheserver/fastpath")

setup(
    ext_modules=[
        Extension(
            "cacheserver.fastpath._fastpath",
            sources=sorted(str(p) for p in FASTPATH.glob("*.c")),
            depends=sorted(str(p) for p in FASTPATH.glob("*.h")),
            extra_compile_args=[
                "-O2",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-fvisibility=hidden",
                "-flto",
            ],
            extra_link_args=["-O2", "-flto"],
            optional=True,
        ),
        Extension(
            "cacheserver.storage._snapshotio",
            sources=["server/cacheserver/storage/_snapshotio.c"],
            libraries=["z"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
    ]
)
