#!/usr/bin/env bash
# Builds the real upstream components the end-to-end tests run (etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl,
# csi-provisioner, csi-resizer) from the Go module proxy, at the versions
# pinned in tests/e2e/tools/*/go.mod; with the argument `localpath`, also
# rancher's local-path-provisioner (only scripts/bench-pods.sh uses it); with
# `storage-e2e`, also the Kubernetes e2e test binary (`e2e.test`, the storage
# suite tests/e2e/storage/run.sh runs) and agnhost (for the image of that
# name the suite runs), both from the same k8s wrapper module.
#
# Binaries are cached outside the repository, in $E2E_CACHE/bin (default
# /var/cache/hostpath-csi-e2e/bin), under a name keyed by the component version
# and a hash of the wrapper module's go.mod + go.sum, so a second run builds
# nothing. Go's own module and build caches (GOMODCACHE, GOCACHE) are used as
# set up on the machine and make a rebuild after a version bump cheaper.
#
# Usage: build-tools.sh [localpath] [storage-e2e]
#   Prints NAME=PATH lines for the built binaries on stdout; logs go to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${E2E_CACHE:-/var/cache/hostpath-csi-e2e}"
bindir="$cache/bin"
logdir="$cache/logs"
mkdir -p "$bindir" "$logdir"
# One build at a time per cache: a second caller (say CI starting the builds
# early, then run.sh) waits here and then finds the binaries built.
exec 9>"$cache/.lock"
flock 9
rm -rf "$bindir"/.build-*   # left by an interrupted build

# The pinned versions (kept in step with tools/*/go.mod).
K8S_VERSION=v1.35.4
ETCD_VERSION=v3.6.16
PROVISIONER_VERSION=v6.4.0
SNAPSHOTTER_VERSION=v8.7.0
RESIZER_VERSION=v2.3.0
LOCALPATH_VERSION=v0.0.30
# The agnhost version test/images/agnhost/VERSION holds at $K8S_VERSION, and
# the tag test/utils/image/manifest.go asks for (checked below).
AGNHOST_VERSION=2.59

# -trimpath keeps absolute paths of this machine out of the binaries and makes
# the build cache independent of where the repository is checked out.
export GOFLAGS="${GOFLAGS:-} -trimpath -buildvcs=false"
export CGO_ENABLED=0

log() { printf '[build-tools %s] %s\n' "$(date +%T)" "$*" >&2; }

key() { # module dir -> short hash of its go.mod and go.sum
  cat "$here/tools/$1/go.mod" "$here/tools/$1/go.sum" | sha256sum | cut -c1-12
}

# build_module MODDIR VERSION LDFLAGS PKG... : builds each PKG (a main package)
# into $bindir/<basename>-<VERSION>-<key> unless already there.
build_module() {
  local mod="$1" version="$2" ldflags="$3"; shift 3
  local k; k="$(key "$mod")"
  local missing=() pkg name
  for pkg in "$@"; do
    name="$(basename "$pkg")"
    [[ "$name" == v3 ]] && name=etcd
    [[ -x "$bindir/$name-$version-$k" ]] || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    local tmp; tmp="$(mktemp -d "$bindir/.build-$mod.XXXXXX")"
    local start=$SECONDS
    log "building ${missing[*]} @ $version (log: $logdir/$mod.log)"
    if ! (cd "$here/tools/$mod" && go build -ldflags "$ldflags" -o "$tmp/" "${missing[@]}") \
        >"$logdir/$mod.log" 2>&1; then
      tail -n 30 "$logdir/$mod.log" >&2
      rm -rf "$tmp"
      log "FAILED building $mod"
      return 1
    fi
    for pkg in "${missing[@]}"; do
      name="$(basename "$pkg")"
      local out="$name"
      [[ "$name" == v3 ]] && { name=etcd; out=v3; [[ -e "$tmp/v3" ]] || out=server; }
      mv "$tmp/$out" "$bindir/$name-$version-$k"
    done
    rm -rf "$tmp"
    log "built $mod in $((SECONDS - start))s"
  fi
  for pkg in "$@"; do
    name="$(basename "$pkg")"
    [[ "$name" == v3 ]] && name=etcd
    echo "$(tr 'a-z-' 'A-Z_' <<<"$name")=$bindir/$name-$version-$k"
  done
}

# build_e2e_test: e2e.test, the compiled test package k8s.io/kubernetes/test/e2e
# (its test-only dependencies have go.sum lines in tools/k8s: see its go.mod).
# Built like a module's commands (cache name, lock, log) but with `go test -c`.
build_e2e_test() {
  local k; k="$(key k8s)"
  local out="$bindir/e2e.test-$K8S_VERSION-$k"
  if [[ ! -x $out ]]; then
    local start=$SECONDS
    log "building e2e.test @ $K8S_VERSION (log: $logdir/e2e.test.log)"
    if ! (cd "$here/tools/k8s" && go test -c -ldflags "$(k8s_ldflags)" -o "$out.tmp" \
        k8s.io/kubernetes/test/e2e) >"$logdir/e2e.test.log" 2>&1; then
      tail -n 30 "$logdir/e2e.test.log" >&2
      rm -f "$out.tmp"
      log "FAILED building e2e.test"
      return 1
    fi
    mv "$out.tmp" "$out"
    log "built e2e.test in $((SECONDS - start))s"
  fi
  echo "E2E_TEST=$out"
}

# build_agnhost: the e2e suite's utility binary, from the k8s module's
# test/images/agnhost, refused if its VERSION is not the tag the image gets.
build_agnhost() {
  local dir
  dir="$(cd "$here/tools/k8s" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)" || return 1
  if [[ "$(cat "$dir/test/images/agnhost/VERSION")" != "$AGNHOST_VERSION" ]]; then
    log "agnhost at $K8S_VERSION is version $(cat "$dir/test/images/agnhost/VERSION"), not $AGNHOST_VERSION"
    return 1
  fi
  build_module k8s "$AGNHOST_VERSION" "-s -w -X main.Version=$AGNHOST_VERSION" \
    k8s.io/kubernetes/test/images/agnhost
}

k8s_ldflags() {
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local f="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    f+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    f+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$f"
}

# The three modules build concurrently; on a 2-core machine Go's own package
# parallelism already fills the cores, so this mostly overlaps downloads and
# link steps.
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
build_module k8s "$K8S_VERSION" "$(k8s_ldflags)" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
  k8s.io/kubernetes/cmd/kubectl >"$out/k8s" &
p1=$!
build_module etcd "$ETCD_VERSION" \
  "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" \
  go.etcd.io/etcd/server/v3 >"$out/etcd" &
p2=$!
build_module provisioner "$PROVISIONER_VERSION" "-s -w -X main.version=$PROVISIONER_VERSION" \
  github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner >"$out/provisioner" &
p3=$!
build_module snapshotter "$SNAPSHOTTER_VERSION" "-s -w -X main.version=$SNAPSHOTTER_VERSION" \
  github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter \
  github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller >"$out/snapshotter" &
p_snap=$!
build_module resizer "$RESIZER_VERSION" "-s -w -X main.version=$RESIZER_VERSION" \
  github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer >"$out/resizer" &
p4=$!
: >"$out/localpath"
p5=""
if [[ " $* " == *" localpath "* ]]; then
  build_module localpath "$LOCALPATH_VERSION" "-s -w -X main.VERSION=$LOCALPATH_VERSION" \
    github.com/rancher/local-path-provisioner >"$out/localpath" &
  p5=$!
fi
rc=0
for p in $p_snap $p1 $p2 $p3 $p4 $p5; do wait "$p" || rc=1; done
((rc == 0)) || exit 1
# After the others: e2e.test compiles most of what the k8s binaries just
# put in Go's build cache, so it builds much faster second.
: >"$out/storage-e2e"
if [[ " $* " == *" storage-e2e "* ]]; then
  { build_e2e_test && build_agnhost; } >"$out/storage-e2e" || exit 1
fi
cat "$out/k8s" "$out/etcd" "$out/provisioner" "$out/snapshotter" "$out/resizer" "$out/localpath" \
  "$out/storage-e2e"
