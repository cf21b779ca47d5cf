#!/usr/bin/env bash
# Builds the container images the local cluster runs, as OCI image archives,
# without Docker or a registry: each image is one gzip layer made with GNU tar
# from a root filesystem assembled here out of this machine's own files
# (Debian packages, binaries we built), plus its config, manifest, index.json
# and oci-layout. `ctr images import` loads such an archive; `skopeo copy
# oci-archive:FILE docker://REGISTRY/NAME:TAG` pushes it to a registry.
#
# The images, under the names the manifests ask for (deploy/ as
# `kubectl kustomize deploy/` renders it, the tests' own manifests):
#   pause           registry.k8s.io/pause:3.10.1 (containerd's sandbox image;
#                   a busybox shell that sleeps until it is told to stop)
#   busybox         docker.io/library/busybox:1.37 (also :latest, and the
#                   name the Kubernetes e2e suite asks for), from busybox-static
#   hostpath-csi    docker.io/library/hostpath-csi:0.1.0: the release driver
#                   binary plus the pool tools it runs (setpriv, mount, umount,
#                   losetup, mkfs.ext4, e2fsck, resize2fs, mkfs.xfs,
#                   xfs_growfs, btrfs, fsfreeze, cp) with their shared libraries, from this
#                   machine's Debian packages
#   csi-provisioner registry.k8s.io/sig-storage/csi-provisioner:<pinned>
#   csi-resizer     registry.k8s.io/sig-storage/csi-resizer:<pinned>
#   csi-snapshotter registry.k8s.io/sig-storage/csi-snapshotter:<pinned>
#   snapshot-controller
#                   registry.k8s.io/sig-storage/snapshot-controller:<pinned>
#                   (the binaries tests/e2e/build-tools.sh builds; the
#                   snapshot pair serves deploy/snapshot-controller and
#                   deploy/components/snapshots)
#   mariadb         hostpath-csi.dev/e2e/mariadb:10.11: Debian bookworm
#                   minbase with mariadb-server (debootstrap, minutes: cached)
#   local-path      docker.io/rancher/local-path-provisioner:v0.0.30 (only
#                   for scripts/bench-pods.sh; built when asked for by name)
#   e2e-agnhost     registry.k8s.io/e2e-test-images/agnhost:2.59: busybox
#                   plus /agnhost built from the k8s module (test/images/
#                   agnhost at the pinned Kubernetes version); for the storage
#                   e2e suite (tests/e2e/storage/run.sh), built when asked for
#   e2e-nginx       registry.k8s.io/e2e-test-images/nginx:1.14-4: busybox
#                   only, no nginx (the storage suite only runs /bin/sh in
#                   it); its default command says so and fails
# The e2e-* names are the ones test/utils/image/manifest.go of the pinned
# Kubernetes version asks for (run.sh checks them against `e2e.test
# --list-images`); the suite's busybox and pause are the images above.
#
# Every archive is cached in $IMAGES_CACHE (default
# /var/cache/hostpath-csi-e2e/images) under a key made from everything that
# goes into it (this script, the binaries, the package versions), so a second
# run builds nothing.
#
# Usage: scripts/images.sh [--import CONTAINERD_SOCKET] [IMAGE...]
#   IMAGE: pause busybox hostpath-csi csi-provisioner csi-resizer
#   csi-snapshotter snapshot-controller mariadb local-path e2e-agnhost
#   e2e-nginx (default: all but local-path and the e2e-* ones). Prints one
#   ARCHIVE line per image on stdout; with --import, also imports each into
#   the k8s.io namespace of the containerd at CONTAINERD_SOCKET.
# Environment:
#   HOSTPATH_CSI_BIN  the driver binary (default: target/release/hostpath-csi,
#                     built with `cargo build --release` when missing)
#   TOOLS_ENV         NAME=PATH lines from tests/e2e/build-tools.sh (default:
#                     run it)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cache="${IMAGES_CACHE:-/var/cache/hostpath-csi-e2e/images}"
mkdir -p "$cache"

PAUSE_IMAGE=registry.k8s.io/pause:3.10.1
BUSYBOX_IMAGES=(docker.io/library/busybox:1.37 docker.io/library/busybox:latest
  registry.k8s.io/e2e-test-images/busybox:1.37.0-1)
DRIVER_IMAGE=docker.io/library/hostpath-csi:0.1.0
PROVISIONER_IMAGE=registry.k8s.io/sig-storage/csi-provisioner:v6.4.0
RESIZER_IMAGE=registry.k8s.io/sig-storage/csi-resizer:v2.3.0
SNAPSHOTTER_IMAGE=registry.k8s.io/sig-storage/csi-snapshotter:v8.7.0
SNAPSHOT_CONTROLLER_IMAGE=registry.k8s.io/sig-storage/snapshot-controller:v8.7.0
MARIADB_IMAGE=hostpath-csi.dev/e2e/mariadb:10.11
LOCALPATH_IMAGE=docker.io/rancher/local-path-provisioner:v0.0.30
E2E_AGNHOST_IMAGE=registry.k8s.io/e2e-test-images/agnhost:2.59
E2E_NGINX_IMAGE=registry.k8s.io/e2e-test-images/nginx:1.14-4
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

log() { printf '[images %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

import_sock=""
want=()
while (($#)); do
  case "$1" in
    --import) import_sock="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) want+=("$1"); shift ;;
  esac
done
((${#want[@]})) || want=(pause busybox hostpath-csi csi-provisioner csi-resizer csi-snapshotter
  snapshot-controller mariadb)

work="$(mktemp -d "$cache/.work.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# oci_archive OUT ROOTFS CONFIG_JSON NAME... : packs ROOTFS as one layer into
# an OCI image-layout tar at OUT, listed in index.json under every NAME.
# The tar is reproducible (sorted, no times, numeric root owner), so the same
# inputs give the same digests.
oci_archive() {
  local out="$1" rootfs="$2" config="$3"; shift 3
  local d="$work/oci.$$"; rm -rf "$d"; mkdir -p "$d/blobs/sha256"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$rootfs" -cf "$d/layer.tar" .
  local diff_id; diff_id="$(sha256sum "$d/layer.tar" | cut -d' ' -f1)"
  gzip -n -6 "$d/layer.tar"
  local layer; layer="$(sha256sum "$d/layer.tar.gz" | cut -d' ' -f1)"
  local layer_size; layer_size="$(stat -c %s "$d/layer.tar.gz")"
  mv "$d/layer.tar.gz" "$d/blobs/sha256/$layer"
  jq -cn --argjson c "$config" --arg d "sha256:$diff_id" '{
      architecture: "amd64", os: "linux",
      created: "1970-01-01T00:00:00Z",
      config: ({Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                WorkingDir: "/"} + $c),
      rootfs: {type: "layers", diff_ids: [$d]}}' >"$d/config.json"
  local cfg; cfg="$(sha256sum "$d/config.json" | cut -d' ' -f1)"
  local cfg_size; cfg_size="$(stat -c %s "$d/config.json")"
  mv "$d/config.json" "$d/blobs/sha256/$cfg"
  jq -cn --arg c "sha256:$cfg" --argjson cs "$cfg_size" --arg l "sha256:$layer" --argjson ls "$layer_size" '{
      schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
      layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $l, size: $ls}]}' \
    >"$d/manifest.json"
  local man; man="$(sha256sum "$d/manifest.json" | cut -d' ' -f1)"
  local man_size; man_size="$(stat -c %s "$d/manifest.json")"
  mv "$d/manifest.json" "$d/blobs/sha256/$man"
  printf '%s\n' "$@" | jq -Rn --arg m "sha256:$man" --argjson s "$man_size" '{
      schemaVersion: 2,
      manifests: [inputs | {mediaType: "application/vnd.oci.image.manifest.v1+json",
        digest: $m, size: $s,
        annotations: {"io.containerd.image.name": .,
                      "org.opencontainers.image.ref.name": (. | sub("^.*:"; ""))}}]}' \
    >"$d/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' >"$d/oci-layout"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
    -C "$d" -cf "$out.tmp" oci-layout index.json blobs
  mv "$out.tmp" "$out"
  rm -rf "$d"
}

# rootfs_skeleton DIR: an empty usr-merged root (as Debian's) with /tmp.
rootfs_skeleton() {
  mkdir -p "$1"/{usr/bin,usr/sbin,usr/lib,usr/lib64,etc,tmp,proc,sys,dev,run,var/tmp}
  chmod 1777 "$1/tmp" "$1/var/tmp"
  ln -s usr/bin "$1/bin"; ln -s usr/sbin "$1/sbin"
  ln -s usr/lib "$1/lib"; ln -s usr/lib64 "$1/lib64"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$1/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$1/etc/group"
}

# copy_libs ROOTFS FILE... : copies into ROOTFS, at their host paths, the
# shared libraries (and the loader) that ldd says each host FILE needs.
copy_libs() {
  local root="$1"; shift
  local f dep real
  for f in "$@"; do
    for dep in $(ldd "$f" 2>/dev/null | grep -oE '/[^ ]+' || true); do
      real="$(realpath "$dep")"
      if [[ ! -e "$root$real" ]]; then
        mkdir -p "$root$(dirname "$real")"
        cp -L "$real" "$root$real"
      fi
      # Reachable under the name it was asked for, too (the skeleton's
      # usr-merge symlinks cover /lib and /bin; the loader's alias may not).
      if [[ ! -e "$root$dep" && ! -L "$root$dep" ]]; then
        mkdir -p "$root$(dirname "$dep")"
        ln -s "$real" "$root$dep"
      fi
    done
  done
}

# copy_with_libs ROOTFS FILE... : each host FILE at its own (resolved) path
# in ROOTFS, with its libraries.
copy_with_libs() {
  local root="$1"; shift
  local f real
  for f in "$@"; do
    real="$(realpath "$f")"
    mkdir -p "$root$(dirname "$f")"
    # The name matters (mke2fs looks at argv[0]): copy under the asked-for name.
    cp -L "$real" "$root$f"
  done
  copy_libs "$root" "$@"
}

busybox_bin() {
  local b
  for b in /usr/bin/busybox /bin/busybox; do
    if [[ -x $b ]] && ! ldd "$b" >/dev/null 2>&1; then echo "$b"; return; fi
  done
  die "no static busybox (apt-get install busybox-static)"
}

# install_busybox ROOTFS: busybox-static with a symlink per applet in /bin.
install_busybox() {
  local bb; bb="$(busybox_bin)"
  cp "$bb" "$1/usr/bin/busybox"
  local a
  for a in $("$bb" --list); do
    [[ -e "$1/usr/bin/$a" || -L "$1/usr/bin/$a" ]] || ln -s busybox "$1/usr/bin/$a"
  done
}

tools_env() { # NAME: a path from build-tools.sh's output
  local v=""
  [[ -n "${TOOLS_ENV:-}" ]] && v="$(grep -m1 "^$1=" "$TOOLS_ENV" | cut -d= -f2-)"
  if [[ -z $v ]]; then
    # Not in the list given (or none given): the optional components are
    # built only when asked for by name.
    local extra=()
    case "$1" in
      LOCAL_PATH_PROVISIONER) extra=(localpath) ;;
      AGNHOST) extra=(storage-e2e) ;;
    esac
    "$repo/tests/e2e/build-tools.sh" "${extra[@]}" >"$work/tools-$1.env"
    v="$(grep -m1 "^$1=" "$work/tools-$1.env" | cut -d= -f2-)"
  fi
  [[ -x "$v" ]] || die "build-tools.sh gave no $1"
  echo "$v"
}

# archive_path NAME KEY [FUNCTION]: where the archive of NAME built from inputs KEY is
# cached. The key covers the code that builds it (the image's own function
# and the packing functions), so editing one image's recipe rebuilds only
# that image.
archive_path() { # NAME KEY [FUNCTION, default build_NAME]
  local code; code="$(declare -f oci_archive rootfs_skeleton copy_libs copy_with_libs install_busybox "${3:-build_${1//-/_}}")"
  echo "$cache/$1-$(printf '%s\n%s' "$code" "$2" | sha256sum | cut -c1-16).tar"
}

pkg_versions() { dpkg-query -W -f '${Package}=${Version} ' "$@" 2>/dev/null; }

build_pause() {
  local key; key="$(sha256sum "$(busybox_bin)" | cut -c1-16)"
  local out; out="$(archive_path pause "$key")"
  if [[ ! -f $out ]]; then
    local r="$work/pause"; rootfs_skeleton "$r"; install_busybox "$r"
    # The sandbox's first process only has to exist until it is stopped.
    printf '#!/bin/sh\ntrap "exit 0" TERM INT\nwhile :; do sleep 86400 & wait $!; done\n' >"$r/pause"
    chmod 0755 "$r/pause"
    oci_archive "$out" "$r" '{"Entrypoint": ["/pause"]}' "$PAUSE_IMAGE"
  fi
  echo "$out"
}

build_busybox() {
  local key; key="$(sha256sum "$(busybox_bin)" | cut -c1-16)"
  local out; out="$(archive_path busybox "$key")"
  if [[ ! -f $out ]]; then
    local r="$work/busybox"; rootfs_skeleton "$r"; install_busybox "$r"
    oci_archive "$out" "$r" '{"Cmd": ["sh"]}' "${BUSYBOX_IMAGES[@]}"
  fi
  echo "$out"
}

# fsfreeze and cp too: busybox's applets of those names lack the options the
# driver passes (`fsfreeze -f`, `cp --reflink=auto --sparse=always -x`), and
# every snapshot and clone on the node image failed with them (the storage e2e
# suite's "provision storage with pvc data source": "fsfreeze: invalid option
# -- 'f'").
driver_tools=(setpriv mount umount losetup mkfs.ext4 e2fsck resize2fs mkfs.xfs xfs_growfs btrfs fsfreeze cp)
build_hostpath_csi() {
  local bin="${HOSTPATH_CSI_BIN:-$repo/target/release/hostpath-csi}"
  if [[ -z "${HOSTPATH_CSI_BIN:-}" ]]; then
    log "cargo build --release (the driver binary for the node image)"
    (cd "$repo" && cargo build --release --quiet -p hostpath-csi)
  fi
  [[ -x $bin ]] || die "no driver binary at $bin"
  local paths=() t p
  for t in "${driver_tools[@]}"; do
    p="$(command -v "$t")" || die "$t is not installed (scripts/setup.sh installs the pool tools)"
    paths+=("$p")
  done
  local key
  key="$(sha256sum "$bin" | cut -c1-16) $(pkg_versions util-linux mount e2fsprogs xfsprogs btrfs-progs libc6)"
  local out; out="$(archive_path hostpath-csi "$key")"
  if [[ ! -f $out ]]; then
    local r="$work/hostpath-csi"; rootfs_skeleton "$r"
    # A shell and coreutils for `kubectl exec` when debugging a node.
    install_busybox "$r"
    # The real tools, not busybox's applets of the same name.
    for t in "${driver_tools[@]}"; do rm -f "$r/usr/bin/$t" "$r/usr/sbin/$t"; done
    copy_with_libs "$r" "${paths[@]}"
    mkdir -p "$r/usr/local/bin"
    cp "$bin" "$r/usr/local/bin/hostpath-csi"
    copy_libs "$r" "$bin"
    [[ -f /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$r/etc/"
    oci_archive "$out" "$r" '{"Entrypoint": ["/usr/local/bin/hostpath-csi"], "Cmd": ["serve"]}' "$DRIVER_IMAGE"
  fi
  echo "$out"
}

# go_image NAME BINARY IMAGE: a static Go binary alone, as
# /usr/local/bin/NAME (on the PATH, as upstream manifests that run it by
# name expect) and /NAME (where the upstream sidecar images keep it).
go_image() {
  local name="$1" bin="$2" image="$3"
  local key; key="$(sha256sum "$bin" | cut -c1-16) $image"
  local out; out="$(archive_path "$name" "$key" go_image)"
  if [[ ! -f $out ]]; then
    local r="$work/$name"; rootfs_skeleton "$r"
    mkdir -p "$r/usr/local/bin"
    cp "$bin" "$r/usr/local/bin/$name"
    ln -s "usr/local/bin/$name" "$r/$name"
    oci_archive "$out" "$r" "$(jq -cn --arg e "/usr/local/bin/$name" '{Entrypoint: [$e]}')" "$image"
  fi
  echo "$out"
}

build_mariadb() {
  local key; key="bookworm $(apt-cache policy mariadb-server 2>/dev/null | awk '/Candidate:/ {print $2}')"
  local out; out="$(archive_path mariadb "$key")"
  if [[ ! -f $out ]]; then
    command -v debootstrap >/dev/null || die "debootstrap is not installed"
    local r="$work/mariadb"
    log "debootstrap bookworm minbase + mariadb-server (takes minutes; cached afterwards)"
    debootstrap --variant=minbase --include=mariadb-server,mariadb-client bookworm "$r" "$DEBIAN_MIRROR" \
      >"$work/debootstrap.log" 2>&1 || { tail -n 20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$r"/var/cache/apt/* "$r"/var/lib/apt/lists/* "$r"/usr/share/doc/* "$r"/usr/share/man/* \
      "$r"/usr/share/locale/* "$r"/var/log/*.log "$r"/var/lib/mysql/*
    rm -f "$r"/dev/* 2>/dev/null || true
    install -m 0755 /dev/stdin "$r/usr/local/bin/mariadb-entrypoint" <<'EOF'
#!/bin/sh
# Starts MariaDB on the data directory /var/lib/mysql/data (a subdirectory,
# so a volume's lost+found does not look like a database). On an empty
# directory it first creates the system tables and a user
# $MARIADB_USER/$MARIADB_PASSWORD (from anywhere, over TCP) owning the
# database $MARIADB_DATABASE.
set -eu
datadir=/var/lib/mysql/data
mkdir -p "$datadir" /run/mysqld
chown mysql:mysql "$datadir" /run/mysqld
if [ ! -d "$datadir/mysql" ]; then
  mariadb-install-db --user=mysql --datadir="$datadir" --skip-test-db >/dev/null
  {
    echo "FLUSH PRIVILEGES;"
    echo "CREATE DATABASE IF NOT EXISTS \`${MARIADB_DATABASE:-app}\`;"
    echo "CREATE USER '${MARIADB_USER:-app}'@'%' IDENTIFIED BY '${MARIADB_PASSWORD:-app}';"
    echo "GRANT ALL ON \`${MARIADB_DATABASE:-app}\`.* TO '${MARIADB_USER:-app}'@'%';"
  } | mariadbd --user=mysql --datadir="$datadir" --bootstrap
fi
exec mariadbd --user=mysql --datadir="$datadir" --bind-address=0.0.0.0 --skip-name-resolve \
  --socket=/run/mysqld/mysqld.sock "$@"
EOF
    oci_archive "$out" "$r" '{"Entrypoint": ["/usr/local/bin/mariadb-entrypoint"], "ExposedPorts": {"3306/tcp": {}}}' "$MARIADB_IMAGE"
  fi
  echo "$out"
}

# build_e2e_agnhost: the storage e2e suite's utility image as upstream lays
# it out (/agnhost, the agnhost-2 alias, Entrypoint /agnhost, Cmd pause) on a
# busybox root: the suite runs its mounttest and pause commands, and sh and
# nsenter (host-exec pods enter the node's mount namespace), which busybox
# has. Upstream's Alpine extras (curl, dig, iperf) serve network tests only.
build_e2e_agnhost() {
  local bin; bin="$(tools_env AGNHOST)"
  local key; key="$(sha256sum "$(busybox_bin)" "$bin" | cut -c1-16 | tr '\n' ' ')"
  local out; out="$(archive_path e2e-agnhost "$key")"
  if [[ ! -f $out ]]; then
    local r="$work/e2e-agnhost"; rootfs_skeleton "$r"; install_busybox "$r"
    cp "$bin" "$r/agnhost"
    ln -s agnhost "$r/agnhost-2"
    mkdir -p "$r/uploads"
    oci_archive "$out" "$r" '{"Entrypoint": ["/agnhost"], "Cmd": ["pause"]}' "$E2E_AGNHOST_IMAGE"
  fi
  echo "$out"
}

# build_e2e_nginx: a busybox root under the nginx name the storage suite asks
# for: it only runs `/bin/sh -c` in it (the exec test). No nginx inside, so a
# test that would need one fails at once with this message, not later.
build_e2e_nginx() {
  local key; key="$(sha256sum "$(busybox_bin)" | cut -c1-16)"
  local out; out="$(archive_path e2e-nginx "$key")"
  if [[ ! -f $out ]]; then
    local r="$work/e2e-nginx"; rootfs_skeleton "$r"; install_busybox "$r"
    printf '#!/bin/sh\necho "%s: built by hostpath-csi scripts/images.sh for the storage e2e suite; busybox only, no nginx" >&2\nexit 1\n' \
      "$E2E_NGINX_IMAGE" >"$r/no-nginx"
    chmod 0755 "$r/no-nginx"
    oci_archive "$out" "$r" '{"Cmd": ["/no-nginx"]}' "$E2E_NGINX_IMAGE"
  fi
  echo "$out"
}

for img in "${want[@]}"; do
  start=$SECONDS
  case "$img" in
    pause) a="$(build_pause)" ;;
    busybox) a="$(build_busybox)" ;;
    hostpath-csi) a="$(build_hostpath_csi)" ;;
    csi-provisioner) a="$(go_image csi-provisioner "$(tools_env CSI_PROVISIONER)" "$PROVISIONER_IMAGE")" ;;
    csi-resizer) a="$(go_image csi-resizer "$(tools_env CSI_RESIZER)" "$RESIZER_IMAGE")" ;;
    csi-snapshotter) a="$(go_image csi-snapshotter "$(tools_env CSI_SNAPSHOTTER)" "$SNAPSHOTTER_IMAGE")" ;;
    snapshot-controller)
      a="$(go_image snapshot-controller "$(tools_env SNAPSHOT_CONTROLLER)" "$SNAPSHOT_CONTROLLER_IMAGE")" ;;
    mariadb) a="$(build_mariadb)" ;;
    local-path) a="$(go_image local-path-provisioner "$(tools_env LOCAL_PATH_PROVISIONER)" "$LOCALPATH_IMAGE")" ;;
    e2e-agnhost) a="$(build_e2e_agnhost)" ;;
    e2e-nginx) a="$(build_e2e_nginx)" ;;
    *) die "unknown image '$img' (pause busybox hostpath-csi csi-provisioner csi-resizer csi-snapshotter snapshot-controller mariadb local-path e2e-agnhost e2e-nginx)" ;;
  esac
  log "$img: $a ($(du -h "$a" | cut -f1), $((SECONDS - start)) s)"
  if [[ -n $import_sock ]]; then
    ctr -a "$import_sock" -n k8s.io images import "$a" >/dev/null ||
      die "ctr images import $a failed"
  fi
  echo "$a"
done
