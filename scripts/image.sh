#!/usr/bin/env bash
# Builds the project's image (the Dockerfile: cacheserver and cacheoperator in one) and the pod
# sandbox image (e2e/images/pause.c), and exports both as archives that `docker load` and
# containerd (`ctr images import`) read:
#
#   <cache>/images/cache-appliance-<version>.tar   cache-appliance:<version> (the chart's default)
#   <cache>/images/pause.tar                       registry.k8s.io/pause:3.10.2 (and :3.10.1)
#
# <cache> is ${E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cache-appliance}, as for
# e2e/build-control-plane.sh. Both are cached by content: the key is a hash of the build inputs
# as git sees them (tracked and untracked-not-ignored files: Dockerfile, .dockerignore,
# pyproject.toml, setup.py, README.md, server/ and operator/ without their tests, and this
# script), kept in <archive>.stamp. When the key matches nothing runs, not even Docker.
#
# Docker: a reachable engine (`docker info`) is used as it is. Otherwise, as root, Debian's
# docker.io is installed and a private daemon runs for the build only: its own data root, exec
# root, pid file and socket under <cache>/docker, no bridge, no iptables or forwarding changes
# (builds use the host's network). Where python:3.11-slim can be neither found nor pulled, a
# stand-in is made with debootstrap (Debian bookworm's Python 3.11, its headers, the host's
# apt sources and extra CA certificates) and imported under that name, so the Dockerfile
# builds unchanged. The pause image needs only a C compiler and python3.
#
# Usage: scripts/image.sh [--rebuild] [--print-archive | --print-ref | --print-id |
#                          --print-pause-archive | --print-pause-ref]
#   (no option)            build what is stale, then say where both archives are
#   --print-archive        the project image's archive path (built first if stale)
#   --print-ref            its image reference, cache-appliance:<version>
#   --print-id             its image ID (sha256:..., the config digest containerd also shows)
#   --print-pause-archive  the pause image's archive path (built first if stale)
#   --print-pause-ref      its image reference
#   --rebuild              ignore the stamps (e.g. after the base image changed)
#   --docker ARGS...       run `docker ARGS...` against the engine the build uses (the
#                          private daemon lives for that one command), e.g.
#                          scripts/image.sh --docker run --rm --network host cache-appliance:0.1.0
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cache-appliance}
IMAGES=$CACHE/images
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -1)
# The chart runs <image.repository>:<appVersion>; the operator's own default is the same.
REPOSITORY=cache-appliance
REF=$REPOSITORY:$VERSION
ARCHIVE=$IMAGES/$REPOSITORY-$VERSION.tar
BASE=python:3.11-slim
# containerd 2.3 pins registry.k8s.io/pause:3.10.2 as its sandbox image, 2.2 pins 3.10.1.
PAUSE_REFS=(registry.k8s.io/pause:3.10.2 registry.k8s.io/pause:3.10.1)
PAUSE_ARCHIVE=$IMAGES/pause.tar
KEY_LABEL=io.cache-appliance.inputs
BASE_LABEL=io.cache-appliance.local-base
# Bounds on every wait (seconds).
DAEMON_START_TIMEOUT=60
DAEMON_STOP_TIMEOUT=30
PULL_TIMEOUT=${IMAGE_PULL_TIMEOUT:-120}

log() { printf '[image] %s\n' "$*" >&2; }
die() {
    log "$*"
    exit 1
}

# ---- content keys ----------------------------------------------------------------------------

input_files() { # NUL-separated, sorted: what goes into the image, as git sees it
    local paths=(Dockerfile .dockerignore pyproject.toml setup.py README.md server operator)
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git ls-files -z -c -o --exclude-standard -- "${paths[@]}" \
            ':!server/tests' ':!operator/tests' | sort -zu | while IFS= read -r -d '' f; do
            [ -f "$f" ] && printf '%s\0' "$f" # a deleted tracked file is not an input
        done
    else # a source tarball: the same set, minus what .gitignore would leave out
        find "${paths[@]}" -type f ! -path 'server/tests/*' ! -path 'operator/tests/*' \
            ! -path '*/__pycache__/*' ! -path '*.egg-info/*' ! -name '*.so' -print0 | sort -z
    fi
}

inputs_key() {
    { input_files | xargs -0 -r sha256sum; sha256sum scripts/image.sh; } | sha256sum | cut -c1-64
}

pause_key() {
    cat e2e/images/pause.c e2e/images/archive.py scripts/image.sh | sha256sum | cut -c1-64
}

stamp_get() { # stamp-file field
    [ -f "$1" ] && sed -n "s/^$2=//p" "$1" | head -1
}

fresh() { # archive key
    [ -f "$1" ] && [ "$(stamp_get "$1.stamp" key)" = "$2" ]
}

# ---- the Docker engine ---------------------------------------------------------------------

DOCKER_DIR=$CACHE/docker
PRIVATE_RUN=$DOCKER_DIR/run
PRIVATE_SOCK=$PRIVATE_RUN/docker.sock
CONTAINERD_SOCK=$PRIVATE_RUN/containerd/containerd.sock
# Relative: under the cgroup of whoever starts runc, removed when the daemon stops.
CGROUP_PARENT=cache-appliance-image-build
private=0
made_dirs=()

wait_for() { # seconds command...: polls every 0.2 s
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

install_docker() {
    command -v dockerd >/dev/null && command -v containerd >/dev/null && return 0
    [ "$(id -u)" = 0 ] || die "no Docker engine is reachable and dockerd is not installed: \
install Debian's docker.io (as root), or start Docker, then run this again"
    log "installing Debian's docker.io (its daemon runs privately, for builds only)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io \
        >/dev/null
}

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# One user of the cache's builds and private daemon at a time; another run waits, then finds
# the archive fresh. The daemons never inherit the lock (9>&-).
lock() {
    [ -n "${LOCKED:-}" ] && return 0
    mkdir -p "$IMAGES"
    exec 9>"$IMAGES/.lock"
    flock -w 3600 9 || die "another scripts/image.sh held $IMAGES/.lock for an hour"
    LOCKED=1
}

start_private_daemon() {
    lock
    install_docker
    mkdir -p "$DOCKER_DIR/data" "$DOCKER_DIR/containerd" "$PRIVATE_RUN/containerd"
    # A daemon left by a killed run is stopped first (a live run would hold the lock).
    stop_private_daemon
    # containerd of its own: dockerd would otherwise share a system containerd whose socket
    # sits at the default path (a node's, say) instead of starting a private one.
    cat >"$PRIVATE_RUN/containerd.toml" <<TOML
version = 2
root = "$DOCKER_DIR/containerd"
state = "$PRIVATE_RUN/containerd"
oom_score = 0
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt"]
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
TOML
    # Its own settings only (not /etc/docker/daemon.json), and its key file in its own tree.
    printf '{"deprecated-key-path": "%s"}\n' "$DOCKER_DIR/key.json" >"$PRIVATE_RUN/daemon.json"
    # Directories the daemons make at fixed paths (shim sockets, plugins): removed at the
    # end if they did not exist before and are empty again.
    made_dirs=()
    local d
    for d in /run/containerd/s /run/containerd /run/docker/plugins /run/docker; do
        [ -e "$d" ] || made_dirs+=("$d")
    done
    private=1
    # Sessions of their own: a Ctrl-C meant for the build reaches them only through the trap.
    setsid containerd --config "$PRIVATE_RUN/containerd.toml" >"$DOCKER_DIR/containerd.log" 2>&1 9>&- &
    echo $! >"$PRIVATE_RUN/containerd.pid"
    wait_for "$DAEMON_START_TIMEOUT" test -S "$CONTAINERD_SOCK" \
        || die "containerd did not start in ${DAEMON_START_TIMEOUT}s; see $DOCKER_DIR/containerd.log"
    setsid dockerd --config-file "$PRIVATE_RUN/daemon.json" \
        --data-root "$DOCKER_DIR/data" --exec-root "$PRIVATE_RUN/exec" \
        --pidfile "$PRIVATE_RUN/dockerd.pid" --host "unix://$PRIVATE_SOCK" \
        --containerd "$CONTAINERD_SOCK" --cgroup-parent "$CGROUP_PARENT" \
        --bridge=none --iptables=false --ip6tables=false --ip-masq=false --ip-forward=false \
        --userland-proxy=false --oom-score-adjust=0 >"$DOCKER_DIR/dockerd.log" 2>&1 9>&- &
    echo $! >"$PRIVATE_RUN/dockerd.pid.launch"
    export DOCKER_HOST=unix://$PRIVATE_SOCK
    # The builder of Docker 20.10's daemon that allows --network host without entitlements.
    export DOCKER_BUILDKIT=0
    wait_for "$DAEMON_START_TIMEOUT" docker info \
        || die "the private dockerd did not answer in ${DAEMON_START_TIMEOUT}s; see $DOCKER_DIR/dockerd.log"
    log "private Docker daemon up ($DOCKER_HOST)"
}

stop_pid() { # pidfile name
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 0
    if pid_alive "$pid" && [ "$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null)")" = "$2" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        wait_for "$DAEMON_STOP_TIMEOUT" bash -c "! kill -0 $pid" \
            || { log "$2 ($pid) ignored SIGTERM for ${DAEMON_STOP_TIMEOUT}s: killing it"; kill -KILL "$pid" 2>/dev/null || true; }
    fi
    rm -f "$1"
}

stop_private_daemon() {
    stop_pid "$PRIVATE_RUN/dockerd.pid.launch" dockerd
    stop_pid "$PRIVATE_RUN/containerd.pid" containerd
    # Shims outlive containerd: any left with a container of ours are ended (by socket path).
    local pid
    for pid in $(pgrep -f "containerd-shim.*-address $CONTAINERD_SOCK" || true); do
        kill -KILL "$pid" 2>/dev/null || true
    done
    # The builder's cgroup parent, in every hierarchy, deepest first (empty by now).
    find /sys/fs/cgroup -depth -type d -name "$CGROUP_PARENT" -exec rmdir {} + 2>/dev/null || true
    # The exec root's mounts (netns files) go with the daemon; anything left is unmounted.
    local m
    for m in $(grep -o " $PRIVATE_RUN/[^ ]*" /proc/self/mounts 2>/dev/null | sort -r || true); do
        umount -l "$m" 2>/dev/null || true
    done
    local d
    for d in "${made_dirs[@]}"; do rmdir "$d" 2>/dev/null || true; done
    made_dirs=()
    if ((private)); then
        private=0
        log "private Docker daemon stopped"
    fi
}

# Whatever way the script ends (Ctrl-C included): no daemon, no half-written file left.
partial_files=()
cleanup() {
    if ((${#partial_files[@]})); then rm -rf "${partial_files[@]}"; fi
    if ((private)); then stop_private_daemon; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

ensure_engine() {
    [ -n "${DOCKER_READY:-}" ] && return 0
    DOCKER_READY=1
    if command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; then
        log "using the Docker engine at ${DOCKER_HOST:-its default socket}"
        return 0
    fi
    start_private_daemon
}

# ---- the base image ------------------------------------------------------------------------

# Debian's archive as the host uses it: its deb822 sources file, else its sources.list lines.
host_debian_sources() {
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        cat /etc/apt/sources.list.d/debian.sources
    elif [ -f /etc/apt/sources.list ]; then
        grep -E '^deb .*/debian(-security)?/? ' /etc/apt/sources.list || true
    fi
}

host_debian_mirror() {
    local uri
    uri=$(host_debian_sources | sed -n -E 's#^(URIs: *|deb +(\[[^]]*\] +)?)([^ ]+/debian)/?( .*)?$#\3#p' | head -1)
    echo "${uri:-http://deb.debian.org/debian}"
}

host_extra_cas() { find /usr/local/share/ca-certificates -type f -name '*.crt' 2>/dev/null | sort; }

BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates,libpython3.11-dev

base_recipe_key() {
    {
        echo "bookworm minbase $BASE_PACKAGES"
        host_debian_sources
        host_extra_cas | xargs -r cat
    } | sha256sum | cut -c1-64
}

ensure_base() {
    local label want
    want=$(base_recipe_key)
    if label=$(docker image inspect -f "{{ index .Config.Labels \"$BASE_LABEL\" }}" "$BASE" 2>/dev/null); then
        # A real python:3.11-slim has no such label: it is used as it is.
        [ -z "$label" ] || [ "$label" = "<no value>" ] || [ "$label" = "$want" ] && return 0
        log "the local stand-in for $BASE is out of date: making it again"
    elif timeout "$PULL_TIMEOUT" docker pull -q "$BASE" >/dev/null 2>&1; then
        log "pulled $BASE"
        return 0
    else
        log "$BASE is not here and cannot be pulled: making a stand-in with debootstrap"
    fi
    make_local_base "$want"
}

make_local_base() { # recipe-key
    [ "$(id -u)" = 0 ] || die "making $BASE locally needs root (debootstrap, chroot)"
    command -v debootstrap >/dev/null || {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
    }
    local root=$IMAGES/base-rootfs started=$SECONDS
    partial_files+=("$root")
    rm -rf "$root"
    mkdir -p "$root"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$root" "$(host_debian_mirror)" \
        >"$IMAGES/debootstrap.log" 2>&1 || die "debootstrap failed; see $IMAGES/debootstrap.log"
    # The host's apt sources (security updates included), and its extra CA certificates: where
    # outbound HTTPS is re-signed by a local CA, apt and pip in the build need to trust it.
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        cp /etc/apt/sources.list.d/debian.sources "$root/etc/apt/sources.list.d/"
        rm -f "$root/etc/apt/sources.list"
    elif [ -n "$(host_debian_sources)" ]; then
        host_debian_sources >"$root/etc/apt/sources.list"
    fi
    host_extra_cas | xargs -r cp -t "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1
    # pip carries its own CA list; the system's has the extra certificates.
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    chroot "$root" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq' \
        >>"$IMAGES/debootstrap.log" 2>&1 || die "apt-get upgrade in the base failed; see $IMAGES/debootstrap.log"
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
        "$root"/usr/share/info/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
    : >"$root/etc/resolv.conf"
    tar -C "$root" --numeric-owner -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change "LABEL $BASE_LABEL=$1" \
        --change 'CMD ["python3"]' - "$BASE" >/dev/null
    rm -rf "$root"
    log "made $BASE from Debian bookworm in $((SECONDS - started))s"
}

# ---- the project's image -------------------------------------------------------------------

build_image() { # key
    ensure_engine
    ensure_base
    local started=$SECONDS network=() list
    if ((private)); then network=(--network host); fi
    list=$(mktemp)
    partial_files+=("$list" "$ARCHIVE.partial")
    input_files >"$list"
    log "building $REF (inputs ${1:0:12})"
    # The context is exactly the hashed files: nothing else in the checkout (a virtualenv, a
    # fast path compiled in place) can reach the image. The build's output goes to stderr:
    # stdout is for what --print-* prints.
    tar --null -T "$list" -c | docker build "${network[@]}" --label "$KEY_LABEL=$1" -t "$REF" - >&2 \
        || die "docker build failed"
    local id
    id=$(docker image inspect -f '{{.Id}}' "$REF")
    docker save -o "$ARCHIVE.partial" "$REF"
    chmod 644 "$ARCHIVE.partial"
    mv "$ARCHIVE.partial" "$ARCHIVE"
    printf 'key=%s\nref=%s\nid=%s\n' "$1" "$REF" "$id" >"$ARCHIVE.stamp"
    # The private daemon's data root keeps the build's layer cache; earlier builds' leftovers
    # (untagged images) go after a day. A user's own engine is left as it is.
    if ((private)); then docker image prune -f --filter until=24h >/dev/null; fi
    log "built $REF ($id) in $((SECONDS - started))s: $ARCHIVE"
}

# ---- the pause image -----------------------------------------------------------------------

build_pause() { # key
    local dir=$IMAGES/pause-build started=$SECONDS id refs=()
    partial_files+=("$PAUSE_ARCHIVE.partial")
    mkdir -p "$dir"
    gcc -static -O2 -s -Wall -Wextra -Werror -o "$dir/pause" e2e/images/pause.c
    for ref in "${PAUSE_REFS[@]}"; do refs+=(--ref "$ref"); done
    id=$(python3 e2e/images/archive.py --out "$PAUSE_ARCHIVE" "${refs[@]}" --entrypoint /pause \
        --user 65535:65535 --label "$KEY_LABEL=$1" "pause=$dir/pause")
    printf 'key=%s\nref=%s\nid=%s\n' "$1" "${PAUSE_REFS[0]}" "$id" >"$PAUSE_ARCHIVE.stamp"
    log "built ${PAUSE_REFS[0]} ($id) in $((SECONDS - started))s: $PAUSE_ARCHIVE"
}

# ---- main ----------------------------------------------------------------------------------

rebuild=0
what=all
while (($#)); do
    arg=$1
    case $arg in
    --rebuild) rebuild=1 ;;
    --print-ref) echo "$REF" && exit 0 ;;
    --print-pause-ref) echo "${PAUSE_REFS[0]}" && exit 0 ;;
    --print-archive | --print-id | --print-pause-archive) what=$arg ;;
    --docker)
        shift
        ensure_engine
        status=0
        docker "$@" || status=$?
        exit $status
        ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
    *) die "unknown option $arg (see --help)" ;;
    esac
    shift
done

lock

if [ "$what" != --print-pause-archive ]; then
    key=$(inputs_key)
    if ((rebuild)) || ! fresh "$ARCHIVE" "$key"; then
        build_image "$key"
    elif [ "$what" = all ]; then
        log "$REF is up to date (inputs ${key:0:12}): $ARCHIVE"
    fi
fi
if [ "$what" = all ] || [ "$what" = --print-pause-archive ]; then
    key=$(pause_key)
    if ((rebuild)) || ! fresh "$PAUSE_ARCHIVE" "$key"; then
        build_pause "$key"
    elif [ "$what" = all ]; then
        log "${PAUSE_REFS[0]} is up to date: $PAUSE_ARCHIVE"
    fi
fi

case $what in
--print-archive) echo "$ARCHIVE" ;;
--print-id) stamp_get "$ARCHIVE.stamp" id ;;
--print-pause-archive) echo "$PAUSE_ARCHIVE" ;;
esac
