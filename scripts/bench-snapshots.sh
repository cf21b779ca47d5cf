#!/usr/bin/env bash
# Runs csi-bench's snapshot scenario the way BENCHMARKS.md was measured: a
# 1 GiB volume holding 768 MiB of data, snapshotted and restored, on each
# pool kind, next to the copy floor on the same filesystem. Each setup gets
# a filesystem of its own in a sparse file on a loop device (6 GiB), so the
# pool, the bench's workdir and the floor share one disk and nothing else
# writes there:
#   dir-ext4    dir pool on ext4 (no reflink: copies)
#   dir-xfs     dir pool on xfs (reflink)
#   image-ext4  image pool on ext4 (the image copied)
#   image-xfs   image pool on xfs (the image reflinked)
#   btrfs       btrfs pool (subvolume snapshots)
# Needs root, mkfs.ext4, mkfs.xfs, mkfs.btrfs. Everything is unmounted and
# detached at exit, also on failure.
# Usage: scripts/bench-snapshots.sh [RUNS] [SETUP...]   (default: 3, all)
# DRIVER=/path/to/hostpath-csi measures another build of the driver.
# JSON lines of each run go to $OUT (default ./bench-snapshots), one file
# per setup and run.
set -euo pipefail
runs="${1:-3}"
shift || true
setups=("$@")
((${#setups[@]})) || setups=(dir-ext4 dir-xfs image-ext4 image-xfs btrfs)
base="${BASE:-/tmp/hostpath-csi-bench-snap}"
out="$(realpath -m "${OUT:-bench-snapshots}")"
cd "$(dirname "$0")/.."
# PROFILE=debug uses debug builds (the copies, not the driver's code,
# take the time here; a release build takes long on a busy machine);
# SKIP_BUILD=1 runs the binaries already built.
profile="${PROFILE:-release}"
if [[ -n ${SKIP_BUILD:-} ]]; then
    :
elif [[ $profile == release ]]; then
    cargo build --release --quiet --bin hostpath-csi --bin csi-bench
else
    cargo build --quiet --bin hostpath-csi --bin csi-bench
fi
bench="$PWD/target/$profile/csi-bench"
bin="${DRIVER:-$PWD/target/$profile/hostpath-csi}"
if [ -e "$base" ]; then
    echo "$base exists; remove it or set BASE" >&2
    exit 2
fi
mkdir -p "$base" "$out"
cleanup() {
    for m in "$base"/*/; do
        mountpoint -q "$m" && umount "$m"
    done
    rm -f "$base"/*.img
    rmdir "$base"/* "$base" 2>/dev/null || true
}
trap cleanup EXIT

# fs SETUP KIND: a fresh filesystem of KIND mounted at $base/SETUP (loop
# devices auto-clear with the unmount).
fs() {
    local img="$base/$1.img" mnt="$base/$1"
    truncate -s 6G "$img"
    case "$2" in
        ext4) mkfs.ext4 -q -F -m 0 "$img" ;;
        xfs) mkfs.xfs -q -f -m reflink=1 "$img" ;;
        btrfs) mkfs.btrfs -q -f "$img" ;;
    esac
    mkdir -p "$mnt"
    mount -o loop "$img" "$mnt"
}

for setup in "${setups[@]}"; do
    case "$setup" in
        dir-ext4) fsk=ext4 kind=dir ;;
        dir-xfs) fsk=xfs kind=dir ;;
        image-ext4) fsk=ext4 kind=image ;;
        image-xfs) fsk=xfs kind=image ;;
        btrfs) fsk=btrfs kind=btrfs ;;
        *) echo "unknown setup $setup" >&2; exit 2 ;;
    esac
    for run in $(seq 1 "$runs"); do
        fs "$setup" "$fsk"
        m="$base/$setup"
        echo "== $setup run $run ($(cut -d' ' -f1-3 /proc/loadavg))" >&2
        "$bench" \
            --endpoint "unix://$m/csi.sock" \
            --driver-cmd "$bin --endpoint unix://$m/csi.sock --node-id n1 --pool p=$m/pool:$kind" \
            --workdir "$m/work" \
            --scenario snapshot --size 1Gi --snapshot-data 768Mi \
            --json "$out/$setup-$run.json" >"$out/$setup-$run.txt" ||
            { cat "$out/$setup-$run.txt" >&2; exit 1; }
        grep -E 'CreateSnapshot|restore|syncfs|subvolume snapshot|skipped' "$out/$setup-$run.txt" >&2 || true
        umount "$m"
        rm -f "$base/$setup.img"
    done
done
