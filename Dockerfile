# One image for both halves of the project: the cache server (`cacheserver`,
# `cacheserver-probe`) and the operator (`cacheoperator`). CacheCluster pods run
# `cacheserver`; the operator's Deployment runs `cacheoperator`.
#
#   docker build -t cache-appliance:0.1.0 .
#
# `make image` (scripts/image.sh) builds the same, where no Docker engine runs or no registry
# can be reached too, and exports it for containerd (docs/e2e.md, "The image").

FROM python:3.11-slim AS build
# A C compiler for the server's compiled parts (setup.py), and zlib's header for the
# snapshot's (the runtime image has zlib itself, which Python's zlib module uses too).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
# The dependencies first, in a layer of their own: a change to the code alone reuses it.
RUN python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
    | pip install --no-cache-dir -r /dev/stdin
COPY server/ server/
COPY operator/ operator/
RUN pip install --no-cache-dir .
# setup.py fails without a compiler; this names what a build stage is missing if a compiled
# part is still absent (an image must not ship without one).
RUN cd / && python -c 'import cacheserver.storage._core, cacheserver.fastpath._fastpath, cacheserver.storage._snapshotio' || { \
      echo "ERROR: a compiled part (cacheserver.storage._core, cacheserver.fastpath._fastpath," \
           "cacheserver.storage._snapshotio) did not build: the build stage needs a C" \
           "compiler with its LTO plugin, Python's headers (Python.h) and zlib.h." >&2; exit 1; }

FROM python:3.11-slim
# The uid/gid the pod templates run as (runAsUser 10001, runAsNonRoot).
RUN groupadd --system --gid 10001 cache \
    && useradd --system --uid 10001 --gid cache --no-create-home --shell /usr/sbin/nologin cache
COPY --from=build /opt/venv /opt/venv
# The root filesystem is read-only in the pods: no .pyc writes, unbuffered logs.
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 11211/tcp 11211/udp 9150/tcp
CMD ["cacheserver"]
