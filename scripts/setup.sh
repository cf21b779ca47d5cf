#!/usr/bin/env bash
# Installs what the test suite needs on a fresh machine, idempotently:
# Debian packages for the btrfs and image pool kinds, and the official
# CSI conformance suite (csi-sanity) built from the Go module proxy at a
# pinned version into a cache outside the repository.
set -euo pipefail

CSI_SANITY_VERSION=v5.6.0
CACHE=${HOSTPATH_CSI_CACHE:-/var/cache/hostpath-csi}
mkdir -p "$CACHE/bin"

# What cannot be installed from Debian's archive is checked first, all at
# once, with one message: Go (Debian's golang is older than the Kubernetes
# components and csi-sanity need) and the Rust toolchain.
GO_MIN=1.25
absent=()
if ! command -v go >/dev/null; then
  absent+=("go: Go $GO_MIN or later, from https://go.dev/dl (put its bin/ on PATH)")
elif ! printf '%s\n%s\n' "go$GO_MIN" "$(go env GOVERSION)" | sort -V -C; then
  absent+=("go: $(go env GOVERSION) is older than $GO_MIN; install a newer one from https://go.dev/dl")
fi
command -v cargo >/dev/null ||
  absent+=("cargo: the Rust toolchain, from https://rustup.rs")
if ((${#absent[@]})); then
  echo "setup: the test suite needs these, which setup cannot install:" >&2
  printf '  - %s\n' "${absent[@]}" >&2
  exit 1
fi

need=()
# Used by the scripts and the end-to-end test: certificates, JSON, HTTP,
# and the helpers written in Python.
command -v openssl >/dev/null || need+=(openssl)
command -v jq >/dev/null || need+=(jq)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3)
command -v mkfs.btrfs >/dev/null || need+=(btrfs-progs)
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v losetup >/dev/null || need+=(mount)
# The local cluster of tests/e2e/pods.sh (scripts/cluster-up.sh): Debian's
# containerd, runc and CNI plugins, busybox for the small images, debootstrap
# for the MariaDB image, iptables for the pods' network.
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
[[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins)
[[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1 || need+=(busybox-static)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v iptables >/dev/null || need+=(iptables)
# The non-Go gRPC clients of tests/clients.rs: a JDK and maven for
# grpc-java, venv for grpcio.
command -v javac >/dev/null || need+=(default-jdk-headless)
command -v mvn >/dev/null || need+=(maven)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

sanity="$CACHE/bin/csi-sanity-$CSI_SANITY_VERSION"
if [[ ! -x $sanity ]]; then
  echo "setup: building csi-sanity $CSI_SANITY_VERSION"
  tmp=$(mktemp -d)
  GOBIN=$tmp go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$CSI_SANITY_VERSION"
  mv "$tmp/csi-sanity" "$sanity"
  rmdir "$tmp"
fi
ln -sf "$sanity" "$CACHE/bin/csi-sanity"

# grpcurl, to call the driver by hand through its gRPC reflection (and
# tests/first_hour.rs, which checks that this works).
GRPCURL_VERSION=v1.9.3
grpcurl="$CACHE/bin/grpcurl-$GRPCURL_VERSION"
if [[ ! -x $grpcurl ]]; then
  echo "setup: building grpcurl $GRPCURL_VERSION"
  tmp=$(mktemp -d)
  GOFLAGS=-trimpath CGO_ENABLED=0 GOBIN=$tmp go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"
  mv "$tmp/grpcurl" "$grpcurl"
  rmdir "$tmp"
fi
ln -sf "$grpcurl" "$CACHE/bin/grpcurl"

# Real gRPC clients that are not Go, for tests/clients.rs, pinned: Python's
# grpcio in a venv, and a grpc-java client compiled with javac against
# grpc-java's jars (fetched by Maven from its pinned pom), cached by a hash
# of its sources.
GRPCIO_VERSION=1.85.1
venv="$CACHE/grpcio-$GRPCIO_VERSION"
if ! "$venv/bin/python" -c 'import grpc' 2>/dev/null; then
  echo "setup: installing grpcio $GRPCIO_VERSION into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "grpcio==$GRPCIO_VERSION"
fi
# Prometheus's Python client, pinned: tests/metrics.rs parses the driver's
# scrape with its OpenMetrics parser (a real parser, strict about the
# format, rather than the test's own reading of the text).
PROMETHEUS_CLIENT_VERSION=0.26.0
prom_venv="$CACHE/prometheus-client-$PROMETHEUS_CLIENT_VERSION"
if ! "$prom_venv/bin/python" -c 'import prometheus_client.openmetrics.parser' 2>/dev/null; then
  echo "setup: installing prometheus-client $PROMETHEUS_CLIENT_VERSION into $prom_venv"
  rm -rf "$prom_venv"
  python3 -m venv "$prom_venv"
  "$prom_venv/bin/pip" install -q "prometheus-client==$PROMETHEUS_CLIENT_VERSION"
fi
java_src=$(cd "$(dirname "$0")/.." && pwd)/tests/clients/java
java_id=$(cat "$java_src/pom.xml" "$java_src/CsiClient.java" | sha256sum | cut -c1-16)
java_dir="$CACHE/grpc-java-client-$java_id"
if [[ ! -f $java_dir/classes/CsiClient.class ]]; then
  echo "setup: building the grpc-java client"
  tmp=$(mktemp -d "$CACHE/grpc-java-client.XXXXXX")
  mvn -q -B -f "$java_src/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$tmp/lib" -DincludeScope=runtime
  javac -d "$tmp/classes" -cp "$tmp/lib/*" "$java_src/CsiClient.java"
  rm -rf "$java_dir"
  mv "$tmp" "$java_dir"
fi
ln -sfn "$java_dir" "$CACHE/grpc-java-client"

echo "setup: done (csi-sanity at $CACHE/bin/csi-sanity)"
