# One image for both halves of the project: the cache server (`cacheserver`,
# `cacheserver-probe`) and the operator (`cacheoperator`). CacheCluster pods run
# `cacheserver`; the operator's Deployment runs `cacheoperator`.
#
#   docker build -t cache-appliance:0.1.0 .

FROM python:3.11-slim AS build
# A C compiler for the server's compiled fast path (setup.py); the runtime image needs none.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY server/ server/
COPY operator/ operator/
RUN pip install --no-cache-dir .

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
