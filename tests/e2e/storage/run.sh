#!/usr/bin/env bash
# The Kubernetes external storage e2e suite (test/e2e/storage/external of
# k8s.io/kubernetes, the suite the reference CSI hostpath driver runs in its
# CI) against hostpath-csi, on a real one-node cluster from
# scripts/cluster-up.sh: the kubelet on /var/lib/kubelet (the suite looks at
# /var/lib/kubelet/pods/<uid>/volumes on the node), deploy/ installed with
# `kubectl apply -k` plus the snapshots component and the `e2e` pool
# (kustomization.yaml), the VolumeSnapshot CRDs and snapshot controller, and
# the suite's own images built here under the names it asks for
# (scripts/images.sh e2e-agnhost e2e-nginx, busybox, pause).
#
# Two selections (README.md here lists both and every skip's reason):
#   run.sh          the CI subset: 13 specs, one of each kind the driver
#                   serves (CI_SPECS below), about 4 minutes on a warm
#                   machine; scripts/test.sh runs this
#   run.sh --all    the whole pass: focus External.Storage, skipping SKIP
#                   below: 110 specs, about 23 minutes
# e2e.test runs with the driver's capabilities from test-driver.yaml. The
# closing lines are
#   storage-e2e skipped: one line per reason, with its count
#   storage-e2e: N passed, M failed, K skipped
# Every spec the focus selects is counted once: passed, failed, or skipped
# at run time (a capability the driver does not declare, a pattern the
# external driver does not offer).
#
# One node: the suite's host-exec pods enter PID 1's mount namespace, which
# is node 1's, so a second kubelet in its own mount namespace (cluster-up's
# NODES=2) would have its volumes checked on the wrong node.
#
# Everything is torn down at exit, also after a failure or an interrupt
# (scripts/cluster-down.sh: processes, mounts, loop devices, /var/lib/kubelet,
# iptables, cgroups); the report stays in $STORAGE_E2E_REPORT_DIR.
#
# Usage (as root): tests/e2e/storage/run.sh [--all]
# Environment:
#   STORAGE_E2E_FOCUS   a ginkgo focus of your own instead of either selection
#   STORAGE_E2E_REPORT_DIR  where the log and the report go (default
#                       /var/tmp/hostpath-csi-storage-e2e, emptied first)
#   E2E_KEEP=1          keep the cluster after a failure (remove it with
#                       CLUSTER_DIR=... scripts/cluster-down.sh)
#   HOSTPATH_CSI_BIN    as for scripts/cluster-up.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
t0=$SECONDS
[[ $(id -u) -eq 0 ]] || { echo "tests/e2e/storage/run.sh must run as root (containerd, kubelet, mounts)" >&2; exit 1; }

all=""
case "${1:-}" in
  --all) all=1 ;;
  "") ;;
  *) echo "usage: tests/e2e/storage/run.sh [--all]" >&2; exit 2 ;;
esac

# Left out of both selections, by tag or by name, each for its reason:
#   Disruptive, Serial, Slow, Flaky: as the reference driver's CI; they
#     restart the kubelet, need the whole cluster, or take tens of minutes.
#   Feature:Windows (Linux nodes), Feature:SELinux (no SELinux here),
#   Feature:VolumeAttributesClass (no ControllerModifyVolume),
#   Feature:volumegroupsnapshot (no group snapshots), Feature:OffByDefault
#   (feature gates the cluster does not turn on), Feature:VolumeSourceXFS
#   (the fsType patterns: the pool decides the filesystem, fsType is not a
#   choice). Feature:VolumeSnapshotDataSource stays in: snapshots are GA and
#   the driver serves them.
#   "should not mount / map unused volumes in a pod": its host-exec pod runs
#     `nsenter --mount=/rootfs/proc/1/ns/mnt`, and on the test machines even
#     root cannot open PID 1's namespaces ("nsenter: cannot open
#     /proc/1/ns/mnt: Permission denied"), so it fails on the machine,
#     whatever the driver does. The only host-exec spec of the selection.
#   "Pre-provisioned Snapshot": the suite makes a VolumeSnapshotContent by
#     hand without the label `snapshot.storage.kubernetes.io/managed-by:
#     <node>`; in distributed snapshotting (the only layout for node-local
#     volumes) each node's csi-snapshotter watches only contents so labelled
#     and the snapshot controller labels only those it creates, so nobody
#     ever reads that snapshot's status and it is never ready.
SKIP='Disruptive|Serial|Slow|Flaky|Feature:(Windows|SELinux|VolumeAttributesClass|volumegroupsnapshot|OffByDefault|VolumeSourceXFS)'
SKIP+='|should not mount / map unused volumes in a pod'
SKIP+='|Pre-provisioned Snapshot'
# The CI subset: one spec of each kind, picked for what it covers per
# minute (each spec's time in the full pass of 2026-12-02), as the part of
# its name after "[Testpattern: ".
CI_SPECS=(
  # 22 s: provisioning, a pod writes and another reads
  'Dynamic PV \(default fs\)\] volumes should store data$'
  # 23 s: a raw block volume
  'Dynamic PV \(block volmode\)\] volumes should store data$'
  # 27 s: a clone
  'Dynamic PV \(default fs\)\] provisioning should provision storage with pvc data source$'
  # 33 s: a VolumeSnapshot and a claim restored from it
  'Dynamic PV \(default fs\)\] provisioning should provision storage with snapshot data source \['
  # 17 s: expansion (online is pods.sh scenario 3)
  'Dynamic PV \(default fs\)\(allowExpansion\)\] volume-expand Verify if offline PVC expansion works$'
  # 11 s: subPath
  'Dynamic PV \(default fs\)\] subPath should support existing directory$'
  # 8 s: CSI inline ephemeral volumes, one per pod
  'CSI Ephemeral-volume \(default fs\)\] ephemeral should support two pods which have the same volume definition$'
  # 9 s: a generic ephemeral volume
  'Generic Ephemeral-volume \(default fs\) \(late-binding\)\] ephemeral should create read/write inline ephemeral volume$'
  # 1 s: CSIStorageCapacity
  'Dynamic PV \(default fs\)\] capacity provides storage capacity information$'
  # 16 s: fsGroup
  'Dynamic PV \(default fs\)\] fsgroupchangepolicy \(OnRootMismatch\)\[LinuxOnly\], pod created with an initial fsgroup, new pod fsgroup applied to volume contents$'
  # 15 s: ReadWriteOncePod
  'Dynamic PV \(default fs\)\] read-write-once-pod should block a second pod'
  # 13 s: topology
  'Dynamic PV \(delayed binding\)\] topology should provision a volume and schedule a pod with AllowedTopologies$'
  # 11 s: mount options reach the pod's mount (they once stayed in the node
  # plugin's own namespace: the whole pass's one failure, since fixed)
  'Dynamic PV \(default fs\)\] provisioning should provision storage with mount options$'
)
if [[ -n ${STORAGE_E2E_FOCUS:-} ]]; then
  FOCUS="$STORAGE_E2E_FOCUS"
elif [[ -n $all ]]; then
  FOCUS='External.Storage'
else
  FOCUS="External Storage \\[Driver: hostpath-csi\\.dev\\] \\[Testpattern: ($(IFS='|'; echo "${CI_SPECS[*]}"))"
fi
report="${STORAGE_E2E_REPORT_DIR:-/var/tmp/hostpath-csi-storage-e2e}"
export NODES=1
export CLUSTER_DIR="${CLUSTER_DIR:-$(mktemp -d /var/tmp/hostpath-csi-storage-e2e-cluster.XXXXXX)}"
rmdir "$CLUSTER_DIR" 2>/dev/null || true   # cluster-up makes it
# The names test/utils/image/manifest.go of the pinned Kubernetes asks for,
# each built by scripts/images.sh (checked against e2e.test below).
E2E_IMAGES=(registry.k8s.io/e2e-test-images/agnhost:2.59 registry.k8s.io/e2e-test-images/busybox:1.37.0-1
  registry.k8s.io/e2e-test-images/nginx:1.14-4 registry.k8s.io/pause:3.10.1)

log() { printf '[storage-e2e %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; echo "storage-e2e: 0 passed, 1 failed, 0 skipped"; exit 1; }

cluster_made=""
cleanup() {
  local rc=$?
  set +e
  if [[ -n $cluster_made ]]; then
    if ((rc != 0)) && [[ -n ${E2E_KEEP:-} ]]; then
      log "kept the cluster in $CLUSTER_DIR (CLUSTER_DIR=$CLUSTER_DIR scripts/cluster-down.sh removes it)"
    elif ! CLUSTER_DIR="$CLUSTER_DIR" "$repo/scripts/cluster-down.sh" >&2; then
      log "error: scripts/cluster-down.sh left something behind (above)"
      ((rc != 0)) || rc=1
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ builds
rm -rf "$report"; mkdir -p "$report"
log "building e2e.test and agnhost (cached after the first run)"
"$repo/tests/e2e/build-tools.sh" storage-e2e >"$report/tools.env" 2>"$report/build-tools.log" ||
  { tail -n 30 "$report/build-tools.log" >&2; die "tests/e2e/build-tools.sh storage-e2e failed"; }
# shellcheck disable=SC1091
source "$report/tools.env"
# A new Kubernetes pin that changes an image tag must fail here, naming it,
# not as a pod stuck on a missing image.
"$E2E_TEST" --list-images >"$report/images.list" 2>/dev/null || die "e2e.test --list-images failed"
for img in "${E2E_IMAGES[@]}"; do
  grep -qxF "$img" "$report/images.list" ||
    die "e2e.test does not ask for $img any more: update scripts/images.sh and run.sh"
done
log "e2e.test and agnhost ready after $((SECONDS - t0)) s"

# ------------------------------------------------------------------ cluster
log "bringing up a one-node cluster in $CLUSTER_DIR"
cluster_made=1
INSTALL="$here" IMAGES="e2e-agnhost e2e-nginx" "$repo/scripts/cluster-up.sh" >&2 ||
  die "scripts/cluster-up.sh failed"
# shellcheck disable=SC1091
source "$CLUSTER_DIR/env"
# The suite starts once the kubelet lists the driver (registration done).
deadline=$((SECONDS + 120))
until [[ "$("$KUBECTL" get csinode "$NODE1_NAME" -o jsonpath='{.spec.drivers[*].name}' 2>/dev/null)" == *hostpath-csi.dev* ]]; do
  ((SECONDS < deadline)) || die "the kubelet did not register hostpath-csi.dev within 120 s"
  sleep 1
done
log "cluster ready after $((SECONDS - t0)) s"

# ------------------------------------------------------------------ suite
log "e2e.test --ginkgo.focus='$FOCUS' --ginkgo.skip='$SKIP' (log: $report/e2e.log)"
suite_start=$SECONDS
suite_rc=0
# From this directory: the suite reads SnapshotClass.FromFile relative to
# its working directory (StorageClass.FromFile relative to --repo-root).
(cd "$here" && "$E2E_TEST" --kubeconfig="$KUBECONFIG" --kubectl-path="$KUBECTL" --provider=local \
  -storage.testdriver="$here/test-driver.yaml" --repo-root="$here" \
  --ginkgo.focus="$FOCUS" --ginkgo.skip="$SKIP" --ginkgo.no-color --ginkgo.timeout=3h \
  --report-dir="$report" --report-complete-ginkgo \
  >"$report/e2e.log" 2>&1) || suite_rc=$?
log "e2e.test exited with $suite_rc after $((SECONDS - suite_start)) s"

[[ -f $report/ginkgo/report.json ]] || { tail -n 40 "$report/e2e.log" >&2; die "e2e.test wrote no report"; }
python3 "$here/summary.py" "$report/ginkgo/report.json" || summary_rc=$?
log "storage e2e done after $((SECONDS - t0)) s"
# A failed spec fails the run; so does e2e.test failing without one (its
# suite set-up, say), which summary.py counts as a failure too.
((${summary_rc:-0} == 0 && suite_rc == 0))
