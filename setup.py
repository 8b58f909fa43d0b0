"""The compiled parts: the server's fast path (server/cacheserver/fastpath/_fastpath.c) and
the warm-restart snapshot's block loops (server/cacheserver/storage/_snapshotio.c, which
takes its crc32 from zlib).

optional=True: where no C compiler (or no zlib.h) is at hand the install still succeeds and
the server runs its Python path (docs/architecture.md).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cacheserver.fastpath._fastpath",
            sources=["server/cacheserver/fastpath/_fastpath.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
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
