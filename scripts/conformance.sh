#!/usr/bin/env bash
# Runs the official CSI conformance suite (csi-sanity) against the real
# driver binary with real mounts, once per pool kind given. The driver
# advertises every service it has (Controller with snapshots and clones,
# Node, GroupController), so csi-sanity runs their specs; it has no flags
# for group snapshots (its GroupController specs need none).
#
#   scripts/conformance.sh BINARY KIND [KIND...]
#     KIND: dir | btrfs | btrfs-qgroup | image-xfs | image-ext4, each
#     optionally with the suffix -block: the same pool, every spec run with
#     raw block volumes (--csi.testvolumeaccesstype block)
#     (btrfs: quotas left to the driver, which turns on simple quotas where
#     the kernel has them; btrfs-qgroup: full qgroups turned on first, which
#     the driver keeps)
#
# Each run gets a fresh temporary directory (pools, socket, mount dirs) and
# cleans up its mounts, loop devices and processes on exit, also on failure.
# Prints one closing line per kind and a total: "N passed, N failed, N skipped".
set -euo pipefail

BIN=${1:?usage: conformance.sh BINARY KIND...}
shift
SANITY=${CSI_SANITY:-csi-sanity}
command -v "$SANITY" >/dev/null || { echo "csi-sanity not found (set CSI_SANITY)"; exit 2; }
# grpcurl (scripts/setup.sh builds it beside csi-sanity) asks the driver's
# Probe whether its pools are open before csi-sanity starts.
GRPCURL=${GRPCURL:-$(dirname "$(command -v "$SANITY")")/grpcurl}
[[ -x $GRPCURL ]] || GRPCURL=$(command -v grpcurl) || { echo "grpcurl not found (set GRPCURL)"; exit 2; }

# The one spec skipped by name, a csi-sanity v5.6.0 bug: "should succeed
# when creating a snapshot with accessibility requirements" compares each
# returned Snapshot.accessible_topology with NodeGetInfo's Topology using
# gomega's Equal, which is reflect.DeepEqual on the Go protobuf structs. The
# NodeGetInfo Topology was encoded into the CreateVolume and CreateSnapshot
# requests first, which filled its internal size cache (48); the one
# decoded from the reply has none (0), so the two never compare equal
# (seen: same segments, sizeCache 48 against 0). Any driver that reports
# where its snapshots are usable fails it; only one that reports nothing
# passes. This driver reports it (its snapshots are usable on their node
# only), and tests/snapshot_topology.rs checks what the spec means: every
# snapshot's topology is NodeGetInfo's, a requisite without this node is
# RESOURCE_EXHAUSTED and makes nothing.
UPSTREAM_BUG='creating a snapshot with accessibility requirements'
UPSTREAM_BUG_WHY="CreateSnapshot with accessibility requirements: skipped by name, a csi-sanity v5.6.0 bug (reflect.DeepEqual of protobuf structs; see scripts/conformance.sh)"

total_pass=0 total_fail=0 total_skip=0
WORK=""
DRIVER_PID=""
cleanup() {
  if [[ -n $DRIVER_PID ]]; then
    kill -TERM "$DRIVER_PID" 2>/dev/null || true
    wait "$DRIVER_PID" 2>/dev/null || true
  fi
  DRIVER_PID=""
  if [[ -n $WORK ]]; then
    # Innermost mounts first; then loop devices backed by files in WORK.
    grep -F " $WORK" /proc/self/mountinfo | awk '{print $5}' | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done || true
    losetup -a 2>/dev/null | grep -F "$WORK" | cut -d: -f1 | while read -r d; do
      losetup -d "$d" 2>/dev/null || true
    done || true
    rm -rf "$WORK"
  fi
  WORK=""
}
trap cleanup EXIT

run_kind() {
  local label=$1 kind=$1 access=mount
  if [[ $kind == *-block ]]; then kind=${kind%-block} access=block; fi
  WORK=$(mktemp -d /tmp/hostpath-csi-conformance.XXXXXX)
  local pool="$WORK/pool" extra=() kind_line fs_line=""
  # Volume sizes per kind: image pools have a floor (what mkfs can make).
  local size=$((16 << 20)) expand=$((32 << 20))
  case $kind in
    dir) kind_line=dir ;;
    btrfs|btrfs-qgroup)
      kind_line=btrfs
      truncate -s 1G "$WORK/btrfs.img"
      mkfs.btrfs -q "$WORK/btrfs.img"
      mkdir -p "$pool"
      mount -o loop "$WORK/btrfs.img" "$pool"
      if [[ $kind == btrfs-qgroup ]]; then
        btrfs quota enable "$pool"
        btrfs quota rescan -W "$pool" >/dev/null
      fi
      ;;
    image-xfs) kind_line=image fs_line='filesystem = "xfs"'; size=$((300 << 20)) expand=$((400 << 20)) ;;
    image-ext4) kind_line=image fs_line='filesystem = "ext4"' ;;
    *) echo "unknown kind $kind"; exit 2 ;;
  esac
  cat > "$WORK/config.toml" <<TOML
[[pools]]
name = "sanity"
path = "$pool"
kind = "$kind_line"
$fs_line
TOML
  printf 'pool: sanity\n' > "$WORK/params.yaml"
  "$BIN" --endpoint "unix://$WORK/csi.sock" --node-id sanity-node \
    --config "$WORK/config.toml" --log-level warn >"$WORK/driver.log" 2>&1 &
  DRIVER_PID=$!
  # The socket is served at once, the pools open after (a btrfs pool turns
  # its quotas on first): calls before that answer UNAVAILABLE, which
  # csi-sanity counts as failures. Wait for Probe to say ready (seconds on
  # a loaded machine, not the 5 s csi-sanity's first specs allow).
  local ready=0
  for _ in $(seq 600); do
    if "$GRPCURL" -plaintext -max-time 2 -d '{}' "unix://$WORK/csi.sock" csi.v1.Identity/Probe 2>/dev/null |
      grep -q '"ready": true'; then
      ready=1
      break
    fi
    sleep 0.1
  done
  ((ready)) || echo "conformance[$label]: the driver was not ready after 60 s"
  if [[ $kind != dir ]]; then extra+=(--csi.testvolumeexpandsize "$expand"); fi
  extra+=(--csi.testvolumeaccesstype "$access")
  local out="$WORK/sanity.out" rc=0
  "$SANITY" --csi.endpoint "$WORK/csi.sock" --csi.mountdir "$WORK/mnt" \
    --csi.stagingdir "$WORK/stage" --csi.testvolumesize "$size" \
    --csi.testvolumeparameters "$WORK/params.yaml" "${extra[@]}" \
    -ginkgo.skip "$UPSTREAM_BUG" -ginkgo.no-color -ginkgo.v >"$out" 2>&1 || rc=$?
  # Why specs were skipped (capabilities the driver does not claim).
  grep -E '^\s*\[SKIPPED\] [A-Za-z]' "$out" | grep -v '\[SKIPPED\] in \[' | sed -E 's/^\s*\[SKIPPED\] //' | sort | uniq -c | sed "s/^/  skipped[$label]: /" || true
  printf '  skipped[%s]:       1 %s\n' "$label" "$UPSTREAM_BUG_WHY"
  local line
  line=$(grep -E '^(SUCCESS|FAIL)!' "$out" | tail -1 || true)
  local p f s
  p=$(sed -nE 's/.* ([0-9]+) Passed.*/\1/p' <<<"$line"); p=${p:-0}
  f=$(sed -nE 's/.* ([0-9]+) Failed.*/\1/p' <<<"$line"); f=${f:-0}
  s=$(sed -nE 's/.* ([0-9]+) Skipped.*/\1/p' <<<"$line"); s=${s:-0}
  # No summary, a failing exit without failed specs, or no spec run at all
  # (a driver that never started) are failures too.
  if [[ -z $line || ( $rc -ne 0 && $f -eq 0 ) || $p -eq 0 ]]; then f=$((f + 1)); fi
  if [[ $f -ne 0 ]]; then
    grep -A3 -E '^\s*\[FAIL\]' "$out" | head -60 || tail -40 "$out"
    echo "--- driver log"; tail -20 "$WORK/driver.log"
  fi
  echo "conformance[$label]: $p passed, $f failed, $s skipped"
  total_pass=$((total_pass + p)); total_fail=$((total_fail + f)); total_skip=$((total_skip + s))
  cleanup
}

for kind in "$@"; do run_kind "$kind"; done
echo "conformance: $total_pass passed, $total_fail failed, $total_skip skipped"
[[ $total_fail -eq 0 ]]
