"""The one compiled part: the server's fast path (server/cacheserver/fastpath/_fastpath.c).

optional=True: where no C compiler is at hand the install still succeeds and the server
runs its Python path (docs/architecture.md).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cacheserver.fastpath._fastpath",
            sources=["server/cacheserver/fastpath/_fastpath.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
