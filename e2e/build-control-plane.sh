#!/usr/bin/env bash
# Builds the binaries of the e2e cluster from their Go modules and caches them outside the
# repository, keyed by version, under
# ${E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cache-appliance}/bin:
#   control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, helm,
#                  prometheus                                   as bin/<name>-<version>
#   nodes:         kubelet, kube-proxy, containerd, containerd-shim-runc-v2, ctr
#                                                               as bin/<name>-<version>
#                  the CNI plugins bridge, host-local, loopback, portmap
#                                                               as bin/cni-<version>/<name>
#   benchmark:     kwok (simulated nodes and pods)              as bin/kwok-<version>
#                  and kwokctl's default stages for it          as bin/kwok-stages-<version>.yaml
# (CNI plugins are found by name in one directory, the one containerd's CNI config points at.)
# runc comes from Debian (scripts/bootstrap.sh). The Go module and build caches live under the
# same directory, so rebuilds are quick; with every binary present a run takes well under a second.
#
# Each component has a small wrapper module under e2e/controlplane/<component>/ whose go.mod
# pins the version (and, for Kubernetes, replaces every staging module with its published
# v0.x.y release: k8s.io/kubernetes lists them as v0.0.0 and only works inside its own tree).
# When versions.env names another version, or the go.mod has no `tool` line for a binary asked
# for here, the wrapper is regenerated (`--pin` forces it).
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
# Every wrapper module declares `go 1.26.0` or, where its dependency requires a newer patch
# release, that one: containerd v2.3.7 and the CNI plugins v1.10.0 require Go 1.26.8.
GO_LINE=1.26
REQUIRED_GO=1.26.8

log() { printf '[build-control-plane] %s\n' "$*" >&2; }

find_go() {
    if command -v go >/dev/null; then
        command -v go
    elif [ -x /usr/local/go/bin/go ]; then
        echo /usr/local/go/bin/go
    else
        cat >&2 <<MSG
[build-control-plane] Go is not installed. The e2e binaries need Go >= $REQUIRED_GO
(containerd $CONTAINERD_VERSION requires it; Debian's golang package is older). Install it:
    curl -fsSL https://go.dev/dl/go${REQUIRED_GO}.linux-amd64.tar.gz | tar -C /usr/local -xz
    export PATH=/usr/local/go/bin:\$PATH
MSG
        exit 1
    fi
}
GO=$(find_go)
go_version=$("$GO" env GOVERSION | sed 's/^go//')
if [ "$(printf '%s\n%s\n' "$REQUIRED_GO" "$go_version" | sort -V | head -1)" != "$REQUIRED_GO" ]; then
    log "Go $go_version at $GO is too old: containerd $CONTAINERD_VERSION needs Go $REQUIRED_GO."
    log "Install a newer Go from https://go.dev/dl/ or set GOTOOLCHAIN=auto to let go fetch one."
    exit 1
fi

is_pinned() { # wrapper-dir module version packages... -> whether go.mod requires the version
    [ -f "$1/go.mod" ] || return 1   # and lists every package as a tool
    (cd "$1" && "$GO" mod edit -json | python3 -c '
import json, sys
mod, version, pkgs = sys.argv[1], sys.argv[2], set(sys.argv[3:])
gomod = json.load(sys.stdin)
required = {r["Path"]: r["Version"] for r in gomod.get("Require") or []}
tools = {t["Path"] for t in gomod.get("Tool") or []}
sys.exit(not (required.get(mod) == version and pkgs <= tools))' "${@:2}")
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
        "$GO" mod edit -go="$GO_LINE.0"
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

# build component module version ldflags name=package...
# Each binary goes to $BIN/<name>-<version>, or with INTO_DIR=<dir> (set by the caller) to
# $BIN/<dir>-<version>/<name>. Only the binaries missing there are built (all of them with --pin).
build() {
    local component=$1 module=$2 version=$3 ldflags=$4
    shift 4
    local pkgs=() names=() need=() dests=() pair name dest
    for pair in "$@"; do
        name=${pair%%=*}
        pkgs+=("${pair#*=}")
        if [ -n "${INTO_DIR:-}" ]; then
            dest="$BIN/$INTO_DIR-$version/$name"
        else
            dest="$BIN/$name-$version"
        fi
        if ((force_pin)) || [ ! -x "$dest" ]; then
            names+=("$name")
            need+=("${pair#*=}")
            dests+=("$dest")
        fi
    done
    if ((${#need[@]} == 0)); then
        log "$component $version: cached"
        return
    fi
    local dir="$here/controlplane/$component"
    if ((force_pin)) || ! is_pinned "$dir" "$module" "$version" "${pkgs[@]}"; then
        pin "$dir" "$module" "$version" "${pkgs[@]}"
        log "wrapper module changed: commit e2e/controlplane/$component/go.mod and go.sum"
    fi
    local start out i built
    start=$(date +%s)
    out=$(mktemp -d "$BIN/.build.XXXXXX")
    log "$component $version: building ${names[*]} (slow the first time)"
    # BUILD_TAGS (set by the caller) selects optional parts, e.g. Prometheus' discoveries.
    (cd "$dir" && nice -n 10 "$GO" build -trimpath ${BUILD_TAGS:+-tags="$BUILD_TAGS"} \
        -ldflags="-s -w $ldflags" -o "$out/" "${need[@]}")
    for i in "${!need[@]}"; do
        built=$(basename "${need[$i]}")
        # go names a binary after the path element before a major-version suffix (/v3).
        [[ $built =~ ^v[0-9]+$ ]] && built=$(basename "$(dirname "${need[$i]}")")
        mkdir -p "$(dirname "${dests[$i]}")"
        mv -f "$out/$built" "${dests[$i]}"
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
    kubectl=k8s.io/kubernetes/cmd/kubectl \
    kubelet=k8s.io/kubernetes/cmd/kubelet \
    kube-proxy=k8s.io/kubernetes/cmd/kube-proxy

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

# The nodes' container runtime. btrfs is the one snapshotter that needs cgo; devmapper and zfs
# are left out too, as nothing here uses them (the nodes use overlayfs). The version package
# is what `containerd --version` prints and what the CRI reports to the kubelet.
containerd_pkg=github.com/containerd/containerd/v2
containerd_ldflags="-X $containerd_pkg/version.Version=$CONTAINERD_VERSION"
containerd_ldflags+=" -X $containerd_pkg/version.Package=$containerd_pkg"
BUILD_TAGS=no_btrfs,no_devmapper,no_zfs build containerd "$containerd_pkg" "$CONTAINERD_VERSION" \
    "$containerd_ldflags" \
    containerd=$containerd_pkg/cmd/containerd \
    containerd-shim-runc-v2=$containerd_pkg/cmd/containerd-shim-runc-v2 \
    ctr=$containerd_pkg/cmd/ctr

# The pod network of ordinary (not hostNetwork) pods: containerd's CRI runs loopback for every
# sandbox and the plugins its CNI config names (e2e/nodes.py: ptp, routed veth pairs with
# host-local IPAM, and portmap).
cni_pkg=github.com/containernetworking/plugins
INTO_DIR=cni build cni-plugins "$cni_pkg" "$CNI_PLUGINS_VERSION" \
    "-X $cni_pkg/pkg/utils/buildversion.BuildVersion=$CNI_PLUGINS_VERSION" \
    host-local=$cni_pkg/plugins/ipam/host-local \
    loopback=$cni_pkg/plugins/main/loopback \
    ptp=$cni_pkg/plugins/main/ptp \
    portmap=$cni_pkg/plugins/meta/portmap

# Simulated nodes and pods (no kubelet, no containers) for the operator's scale benchmark,
# `make bench-operator`: kwok fakes the kubelet's side of every pod on nodes it owns.
build kwok sigs.k8s.io/kwok "$KWOK_VERSION" \
    "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" \
    kwok=sigs.k8s.io/kwok/cmd/kwok
# The kwok binary has no stages of its own (kwokctl hands it these): the defaults of kwokctl
# at the same version, from the module, as one config file for `kwok --config`: nodes Ready
# at once and kept alive by leases; pods Running and Ready as soon as they are bound.
kwok_stages="$BIN/kwok-stages-$KWOK_VERSION.yaml"
if ((force_pin)) || [ ! -s "$kwok_stages" ]; then
    kwok_dir=$(cd "$here/controlplane/kwok" && "$GO" mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
    for stage in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
        pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
        printf -- '---\n'
        cat "$kwok_dir/kustomize/stage/$stage.yaml"
    done >"$kwok_stages.tmp"
    mv -f "$kwok_stages.tmp" "$kwok_stages"
    log "kwok $KWOK_VERSION: stages in ${kwok_stages#"$BIN/"}"
fi

log "all binaries ready in $BIN ($(($(date +%s) - total_start))s)"
