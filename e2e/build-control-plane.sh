#!/usr/bin/env bash
# Builds the binaries of the e2e control plane from their Go modules and caches them outside
# the repository, keyed by version:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, helm, prometheus
# into ${E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cache-appliance}/bin/<name>-<version>.
# The Go module and build caches live under the same directory, so a second run takes seconds.
#
# Each component has a small wrapper module under e2e/controlplane/<component>/ whose go.mod
# pins the version (and, for Kubernetes, replaces every staging module with its published
# v0.x.y release: k8s.io/kubernetes lists them as v0.0.0 and only works inside its own tree).
# When versions.env names another version the wrapper is regenerated (`--pin` forces it).
#
# Usage: e2e/build-control-plane.sh [--pin] [--print-bin-dir]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=controlplane/versions.env
source "$here/controlplane/versions.env"

CACHE=${E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cache-appliance}
BIN="$CACHE/bin"
if [ "${1:-}" = --print-bin-dir ]; then
    echo "$BIN"
    exit 0
fi
force_pin=0
[ "${1:-}" = --pin ] && force_pin=1

export GOPATH="$CACHE/go"
export GOMODCACHE="$CACHE/go/mod"
export GOCACHE="$CACHE/go/build"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
# Never fetch a different Go toolchain behind the user's back; set GOTOOLCHAIN=auto to allow it.
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}
REQUIRED_GO=1.26

log() { printf '[build-control-plane] %s\n' "$*" >&2; }

find_go() {
    if command -v go >/dev/null; then
        command -v go
    elif [ -x /usr/local/go/bin/go ]; then
        echo /usr/local/go/bin/go
    else
        cat >&2 <<MSG
[build-control-plane] Go is not installed. The control plane needs Go >= $REQUIRED_GO
(Kubernetes $KUBERNETES_VERSION requires it; Debian's golang package is older). Install it:
    curl -fsSL https://go.dev/dl/go${REQUIRED_GO}.0.linux-amd64.tar.gz | tar -C /usr/local -xz
    export PATH=/usr/local/go/bin:\$PATH
MSG
        exit 1
    fi
}
GO=$(find_go)
go_version=$("$GO" env GOVERSION | sed 's/^go//')
if [ "$(printf '%s\n%s\n' "$REQUIRED_GO" "$go_version" | sort -V | head -1)" != "$REQUIRED_GO" ]; then
    log "Go $go_version at $GO is too old: Kubernetes $KUBERNETES_VERSION needs Go >= $REQUIRED_GO."
    log "Install a newer Go from https://go.dev/dl/ or set GOTOOLCHAIN=auto to let go fetch one."
    exit 1
fi

have_all() { # version name...
    local version=$1 name
    shift
    for name in "$@"; do [ -x "$BIN/$name-$version" ] || return 1; done
}

pinned_version() { # wrapper-dir module -> the version go.mod requires, empty if none
    [ -f "$1/go.mod" ] || return 0
    (cd "$1" && "$GO" mod edit -json | python3 -c '
import json, sys
mod = sys.argv[1]
for r in json.load(sys.stdin).get("Require") or []:
    if r["Path"] == mod:
        print(r["Version"])' "$2")
}

pin() { # wrapper-dir module version packages...
    local dir=$1 module=$2 version=$3
    shift 3
    log "pinning $module@$version in ${dir#"$here/"}/go.mod"
    rm -f "$dir/go.mod" "$dir/go.sum"
    mkdir -p "$dir"
    (
        cd "$dir"
        "$GO" mod init "cache-appliance.invalid/e2e/controlplane/$(basename "$dir")" 2>/dev/null
        # The lowest Go the modules accept, not whichever patch release ran `go mod init`.
        "$GO" mod edit -go="$REQUIRED_GO.0"
        if [ "$module" = k8s.io/kubernetes ]; then
            # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with
            # ./staging/... paths that mean nothing outside its tree. Each is published as
            # v0.<minor>.<patch>; generate the replace list from its own go.mod.
            local gomod staging
            gomod=$("$GO" mod download -json "$module@$version" | python3 -c \
                'import json,sys; print(json.load(sys.stdin)["GoMod"])')
            staging="v0.${version#v1.}"
            "$GO" mod edit -json "$gomod" | python3 -c '
import json, sys
for r in json.load(sys.stdin).get("Replace") or []:
    if r["New"]["Path"].startswith("./staging/"):
        print(r["Old"]["Path"])' | while read -r m; do
                "$GO" mod edit -replace="$m=$m@$staging"
            done
        fi
        local pkgs=()
        for p in "$@"; do pkgs+=("$p@$version"); done
        "$GO" get -tool "${pkgs[@]}"
        "$GO" mod tidy
    )
}

build() { # component module version binary-name=package...
    local component=$1 module=$2 version=$3 ldflags=$4
    shift 4
    local names=() pkgs=() pair
    for pair in "$@"; do
        names+=("${pair%%=*}")
        pkgs+=("${pair#*=}")
    done
    local dir="$here/controlplane/$component"
    if ((force_pin == 0)) && have_all "$version" "${names[@]}"; then
        log "$component $version: cached"
        return
    fi
    if ((force_pin)) || [ "$(pinned_version "$dir" "$module")" != "$version" ]; then
        pin "$dir" "$module" "$version" "${pkgs[@]}"
        log "wrapper module changed: commit e2e/controlplane/$component/go.mod and go.sum"
    fi
    local start out
    start=$(date +%s)
    out=$(mktemp -d "$BIN/.build.XXXXXX")
    log "$component $version: building ${names[*]} (slow the first time)"
    # BUILD_TAGS (set by the caller) selects optional parts, e.g. Prometheus' discoveries.
    (cd "$dir" && nice -n 10 "$GO" build -trimpath ${BUILD_TAGS:+-tags="$BUILD_TAGS"} \
        -ldflags="-s -w $ldflags" -o "$out/" "${pkgs[@]}")
    for pair in "$@"; do
        local name=${pair%%=*} pkg=${pair#*=} built
        built=$(basename "$pkg")
        # go names a binary after the path element before a major-version suffix (/v3).
        [[ $built =~ ^v[0-9]+$ ]] && built=$(basename "$(dirname "$pkg")")
        mv -f "$out/$built" "$BIN/$name-$version"
    done
    rmdir "$out"
    log "$component $version: built in $(($(date +%s) - start))s"
}

mkdir -p "$BIN"
total_start=$(date +%s)

build etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "" \
    etcd=go.etcd.io/etcd/server/v3

# Without these the binaries report v0.0.0-master, which helm's kubeVersion checks and
# kubectl's skew warnings would trip over.
k8s_minor=${KUBERNETES_VERSION#v1.}
k8s_minor=${k8s_minor%%.*}
k8s_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    k8s_ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1"
    k8s_ldflags+=" -X $pkg.gitMinor=$k8s_minor -X $pkg.gitTreeState=clean"
done
build kubernetes k8s.io/kubernetes "$KUBERNETES_VERSION" "$k8s_ldflags" \
    kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
    kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
    kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler \
    kubectl=k8s.io/kubernetes/cmd/kubectl

build helm helm.sh/helm/v3 "$HELM_VERSION" \
    "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    helm=helm.sh/helm/v3/cmd/helm

# Prometheus for the observability test (Debian's package has no Kubernetes discovery), built
# with Kubernetes discovery only: the other discoveries would compile in every cloud's SDK.
# No web UI assets either; the HTTP API is all the tests use.
prometheus_release=3.${PROMETHEUS_VERSION#v0.3}
BUILD_TAGS=remove_all_sd,enable_kubernetes_sd build prometheus github.com/prometheus/prometheus \
    "$PROMETHEUS_VERSION" \
    "-X github.com/prometheus/common/version.Version=$prometheus_release" \
    prometheus=github.com/prometheus/prometheus/cmd/prometheus

log "all binaries ready in $BIN ($(($(date +%s) - total_start))s)"
