#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine: the system packages the
# tests compare against (memcached, libmemcached-tools) and a virtual environment with the
# Python dependencies. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_pkgs=()
command -v memcached >/dev/null || need_pkgs+=(memcached)
command -v memccapable >/dev/null || need_pkgs+=(libmemcached-tools)
# The e2e control plane's certificates (e2e/pki.py).
command -v openssl >/dev/null || need_pkgs+=(openssl)
# promtool checks every alert and dashboard expression (the e2e suite's Prometheus server is
# built by make e2e-bins: Debian's has no Kubernetes discovery).
command -v promtool >/dev/null || need_pkgs+=(prometheus)
# Both install into /usr/sbin, which a normal user's PATH may leave out.
sbin_has() { PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null; }
# The e2e nodes' OCI runtime: containerd (built by make e2e-bins) starts containers with it.
sbin_has runc || need_pkgs+=(runc)
# kube-proxy's Service rules and the CNI bridge/portmap plugins' NAT (the e2e pod network).
sbin_has iptables || need_pkgs+=(iptables)
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || need_pkgs+=(python3-venv)
# The server's compiled fast path (setup.py) needs a C compiler and Python's headers.
command -v cc >/dev/null || need_pkgs+=(gcc)
"$PYTHON" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || need_pkgs+=(python3-dev)
# The warm-restart snapshot's C loops (setup.py) take zlib's crc32.
[ -e /usr/include/zlib.h ] || need_pkgs+=(zlib1g-dev)
if ((${#need_pkgs[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "bootstrap: missing Debian packages: ${need_pkgs[*]}; install them as root" >&2
        exit 1
    fi
    echo "bootstrap: installing ${need_pkgs[*]}"
    apt-get update -qq
    # --no-install-recommends: prometheus would pull in node-exporter, which nothing here uses.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need_pkgs[@]}" >/dev/null
fi

stamp="$VENV/.installed"
# The compiled parts are rebuilt when one of their C files changed since the last install.
c_changed() {
    [ -n "$(find server/cacheserver/fastpath server/cacheserver/storage -name '*.[ch]' \
        -newer "$stamp" -print -quit)" ]
}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
    || c_changed; then
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    touch "$stamp"
fi
