#!/usr/bin/env bash
# The story of issue 9 on real pods: a real kubelet, the real scheduler,
# deploy/'s DaemonSet as the node plugin (installed with `kubectl apply -k`,
# plus the test's image pool: tests/e2e/pods/), and a MariaDB Deployment
# whose data lives on hostpath-csi volumes.
#
#   1 static volume: an operator's directory in the hdd pool, a PV and a
#     claim for it; the database starts on it, a client pod writes rows
#     through the Service's endpoint, the database pod is deleted, the
#     Deployment's new pod has the rows.
#   2 dynamic volume on `ssd`: the scheduler picks the node, csi-provisioner
#     there creates the volume, the kubelet publishes it; the data is in the
#     ssd pool's dir on that node; rows survive a pod deletion; deleting the
#     claim deletes the PV and the data.
#   3 expansion on `img` (xfs images, sizes enforced): the claim is resized
#     while the database runs; `df` in the container shows the new size and
#     the pod writes past the old one.
#   4 two nodes (NODES=2): a claim that fits only node 2's pool is placed
#     and provisioned there; node 1 never sees it.
#   5 snapshots (tests/e2e/pods/snapshots.sh): deploy/examples' snapshot,
#     restore and clone of the database's claim, on the snapshot's node and
#     (NODES=2) on the wrong one; the source deleted, the snapshot kept.
#   6 orphans (tests/e2e/pods/orphans.sh): a deleted and a released PV, reported by the driver, reclaimed.
#   7 inline ephemeral volumes (tests/e2e/pods/ephemeral.sh): deploy/examples/ephemeral.yaml; refused pools and sizes, enforced size, removal with the pod.
#
# There is no CoreDNS in the cluster: a client reaches the headless
# Service's pod through the address in the Service's EndpointSlice, which is
# what DNS would answer.
#
# Usage (as root): tests/e2e/pods.sh
# Environment: NODES (default 2), CLUSTER_DIR (default a temp dir),
#   E2E_KEEP=1 keeps the cluster after a failure (scripts/cluster-down.sh
#   removes it), HOSTPATH_CSI_BIN as for cluster-up.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
t0=$SECONDS
[[ $(id -u) -eq 0 ]] || { echo "tests/e2e/pods.sh must run as root (containerd, kubelet, mounts)" >&2; exit 1; }

export NODES="${NODES:-2}"
# The snapshot CRDs and controller come with the cluster; the install adds
# the snapshots component (tests/e2e/pods/kustomization.yaml).
export SNAPSHOTS=1
export CLUSTER_DIR="${CLUSTER_DIR:-$(mktemp -d /var/tmp/hostpath-csi-pods.XXXXXX)}"
rmdir "$CLUSTER_DIR" 2>/dev/null || true   # cluster-up makes it
NS=hostpath-csi
APP=story
passed=0
failed=0
current=""

log() { printf '[pods %s] %s\n' "$(date +%T)" "$*" >&2; }

cleanup() {
  local rc=$?
  set +e
  if ((rc != 0)) && [[ -n ${E2E_KEEP:-} ]]; then
    log "kept the cluster in $CLUSTER_DIR (scripts/cluster-down.sh with CLUSTER_DIR=$CLUSTER_DIR removes it)"
  else
    CLUSTER_DIR="$CLUSTER_DIR" "$repo/scripts/cluster-down.sh" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

dump() {
  [[ -n ${KUBECONFIG:-} ]] || return 0
  k get pods,pvc,pv,csistoragecapacities -A -o wide >&2 2>&1
  k get events -A --sort-by=.lastTimestamp 2>&1 | tail -n 40 >&2
  local p
  for p in $(k get pods -n "$NS" -o name 2>/dev/null); do
    echo "----- $p" >&2
    k logs -n "$NS" "$p" --all-containers --tail=20 >&2 2>&1
  done
  for p in "$CLUSTER_DIR"/logs/kubelet-*.log; do
    echo "----- $(basename "$p")" >&2; grep -E '^E' "$p" | tail -n 15 >&2
  done
}
fail() {
  log "FAIL: ${current:-setup}: $*"
  echo "FAIL: ${current:-setup}: $*"
  failed=$((failed + 1))
  dump
  echo "e2e: $passed passed, $failed failed"
  exit 1
}
scenario() { current="$1"; log "=== $1"; }
pass() { log "PASS: $current ($((SECONDS - s0)) s)"; echo "PASS: $current"; passed=$((passed + 1)); current=""; }
wait_for() { # SECONDS WHAT CMD...
  local timeout="$1" what="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "timed out after ${timeout}s waiting for $what"
    sleep 0.5
  done
}

# ------------------------------------------------------------------ cluster
log "bringing up a $NODES-node cluster in $CLUSTER_DIR"
INSTALL=none "$repo/scripts/cluster-up.sh" >&2 || fail "scripts/cluster-up.sh failed"
# shellcheck disable=SC1091
source "$CLUSTER_DIR/env"
k() { "$KUBECTL" "$@"; }
node_exec() { # N CMD... : CMD in node N's mount namespace
  local n="$1"; shift
  if ((n == 1)); then "$@"; else nsenter --mount="$CLUSTER_DIR/state/node$n.mntns" -- "$@"; fi
}

# Pools: tmpfs of known sizes, so capacity is predictable. Node 2's ssd is
# the only one that can hold the big claim of scenario 4; either node's ssd
# holds scenario 5's database with its snapshot, two restores and a clone
# (each a full copy on a dir pool, about 110 MiB).
pool_mount() { # NODE POOL SIZE
  node_exec "$1" sh -ec "mkdir -p /var/lib/hostpath-csi/$2
    mount -t tmpfs -o size=$3,mode=0755 pods-n$1-$2 /var/lib/hostpath-csi/$2"
}
for n in $(seq "$NODES"); do
  pool_mount "$n" hdd 256m
  pool_mount "$n" img 2g
done
pool_mount 1 ssd 1g
((NODES < 2)) || pool_mount 2 ssd 2g

scenario "install: kubectl apply -k of deploy/ (plus the test's image pool) runs the node plugin on every node"
s0=$SECONDS
k apply -k "$here/pods" >"$CLUSTER_DIR/logs/install.log" 2>&1 || { cat "$CLUSTER_DIR/logs/install.log" >&2; fail "kubectl apply -k"; }
ds_ready() {
  [[ "$(k get ds -n "$NS" hostpath-csi-node -o jsonpath='{.status.desiredNumberScheduled} {.status.numberReady}')" == "$NODES $NODES" ]]
}
wait_for 180 "the node plugin Ready on $NODES node(s)" ds_ready
# The kubelet registered the driver on every node: CSINode lists it with its
# topology key, and the node carries the topology label.
for n in $(seq "$NODES"); do
  node="$(cl_name=NODE${n}_NAME; echo "${!cl_name}")"
  csinode_has_driver() {
    [[ "$(k get csinode "$1" -o jsonpath='{.spec.drivers[?(@.name=="hostpath-csi.dev")].topologyKeys[0]}')" == topology.hostpath-csi.dev/node ]]
  }
  wait_for 60 "CSINode $node to list hostpath-csi.dev" csinode_has_driver "$node"
  [[ "$(k get node "$node" -o jsonpath='{.metadata.labels.topology\.hostpath-csi\.dev/node}')" == "$node" ]] ||
    fail "node $node has no topology label"
done
# The snapshots component: csi-snapshotter in every node plugin pod (Ready
# above), the default VolumeSnapshotClass; the controller came with the
# cluster.
[[ "$(k get ds -n "$NS" hostpath-csi-node -o json | jq -r '[.spec.template.spec.containers[].name] | index("csi-snapshotter") != null')" == true ]] ||
  fail "the node plugin has no csi-snapshotter"
[[ "$(k get volumesnapshotclass hostpath-csi -o jsonpath='{.driver}')" == hostpath-csi.dev ]] ||
  fail "no VolumeSnapshotClass hostpath-csi"
k create namespace "$APP" >/dev/null
pass

# ------------------------------------------------------------------ helpers
a() { k -n "$APP" "$@"; }
db_apply() { # NAME CLAIM
  sed -e "s/NAME/$1/g" -e "s/CLAIM/$2/g" "$here/pods/mariadb.yaml" | a apply -f - >/dev/null
}
db_pod() { # NAME: the Deployment's running pod
  a get pods -l "app=$1" -o json |
    jq -er '[.items[] | select(.metadata.deletionTimestamp == null and .status.phase == "Running")] | if length == 1 then .[0].metadata.name else error("not one") end'
}
db_ready() { # NAME: exactly one pod, ready, listed ready in the Service's endpoints
  local ip
  ip="$(a get endpointslices -l "kubernetes.io/service-name=$1" -o json |
    jq -er '[.items[].endpoints[]? | select(.conditions.ready) | .addresses[0]] | if length == 1 then .[0] else error("not one") end')" &&
    db_pod "$1" >/dev/null
}
db_ip() {
  a get endpointslices -l "kubernetes.io/service-name=$1" -o json |
    jq -er '[.items[].endpoints[]? | select(.conditions.ready) | .addresses[0]] | .[0]'
}
sql() { # NAME SQL: run SQL through the client pod against the Service's endpoint
  a exec "$1-client" -- mariadb -h "$(db_ip "$1")" -u app -papp-secret app -N -B -e "$2"
}
client_ready() { [[ "$(a get pod "$1-client" -o jsonpath='{.status.phase}')" == Running ]]; }
pvc_bound() { [[ "$(a get pvc "$1" -o jsonpath='{.status.phase}')" == Bound ]]; }
pv_of() { a get pvc "$1" -o jsonpath='{.spec.volumeName}'; }
pv_gone() { ! k get pv "$1" >/dev/null 2>&1; }
pod_node() { a get pod "$1" -o jsonpath='{.spec.nodeName}'; }
claim() { # NAME CLASS SIZE
  a apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: $1
spec:
  storageClassName: $2
  accessModes: ["ReadWriteOnce"]
  resources:
    requests:
      storage: $3
EOF
}
# rows_survive_pod_deletion NAME: deletes the database pod; the
# Deployment's new pod must come up Ready with the same rows.
rows_survive_pod_deletion() {
  local name="$1" old new before
  before="$(sql "$name" 'SELECT COUNT(*), SUM(n) FROM t')"
  old="$(db_pod "$name")"
  a delete pod "$old" --wait=true >/dev/null
  wait_for 180 "a new $name pod Ready" db_ready "$name"
  new="$(db_pod "$name")"
  [[ $new != "$old" ]] || fail "the database pod was not replaced"
  local after; after="$(sql "$name" 'SELECT COUNT(*), SUM(n) FROM t')"
  [[ $after == "$before" ]] || fail "rows after the pod was replaced: '$after', before: '$before'"
  log "  $old deleted; $new on $(pod_node "$new") has the same rows ($after)"
}

# ------------------------------------------------------------------ 1 static
scenario "1 static volume: an operator's directory as a PV; MariaDB's rows survive the deletion of its pod"
s0=$SECONDS
mkdir /var/lib/hostpath-csi/hdd/mysql-static
sed "s/NODE_NAME/$NODE1_NAME/; s/static-data/mysql-static/g" "$repo/deploy/examples/static-volume.yaml" | a apply -f - >/dev/null
wait_for 60 "the static claim Bound" pvc_bound mysql-static
db_apply db1 mysql-static
wait_for 240 "MariaDB on the static volume Ready" db_ready db1
wait_for 60 "the client pod" client_ready db1
sql db1 'CREATE TABLE t (id INT PRIMARY KEY AUTO_INCREMENT, n INT NOT NULL); INSERT INTO t (n) VALUES (1), (2), (3)'
[[ "$(sql db1 'SELECT SUM(n) FROM t')" == 6 ]] || fail "rows written through the Service not read back"
# The database files are in the operator's directory on the node.
[[ -d /var/lib/hostpath-csi/hdd/mysql-static/data/app ]] || fail "no database dir in the static volume's directory"
rows_survive_pod_deletion db1
pass

# ------------------------------------------------------------------ 2 dynamic
scenario "2 dynamic volume on ssd: scheduled, provisioned and published on the node; rows survive; deleting the claim deletes the data"
s0=$SECONDS
claim mysql-ssd ssd 64Mi
db_apply db2 mysql-ssd
wait_for 240 "MariaDB on the ssd claim Ready" db_ready db2
pv="$(pv_of mysql-ssd)"
node="$(pod_node "$(db_pod db2)")"
n=1; [[ $node == "${NODE2_NAME:-}" ]] && n=2
got="$(k get pv "$pv" -o jsonpath='{.spec.csi.volumeHandle} {.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}')"
[[ $got == "ssd:$pv $node" ]] || fail "PV $pv: '$got' (the pod runs on $node)"
[[ "$(a get pvc mysql-ssd -o jsonpath='{.metadata.annotations.volume\.kubernetes\.io/selected-node}')" == "$node" ]] ||
  fail "the scheduler's selected-node annotation is not $node"
wait_for 60 "the client pod" client_ready db2
sql db2 'CREATE TABLE t (id INT PRIMARY KEY AUTO_INCREMENT, n INT NOT NULL); INSERT INTO t (n) VALUES (10), (20)'
node_exec "$n" test -d "/var/lib/hostpath-csi/ssd/$pv/data/app" || fail "no database dir in the ssd pool's $pv on node $n"
rows_survive_pod_deletion db2
a delete deployment db2 --wait=true >/dev/null
a delete pod db2-client --wait=false >/dev/null
wait_for 120 "the database pod gone" sh -c "! $KUBECTL -n $APP get pods -l app=db2 -o name | grep -q ."
a delete pvc mysql-ssd --wait=true >/dev/null
wait_for 120 "PV $pv deleted" pv_gone "$pv"
node_exec "$n" test ! -e "/var/lib/hostpath-csi/ssd/$pv" || fail "the data of $pv is still in the ssd pool"
pass

# ------------------------------------------------------------------ 3 expansion
scenario "3 expansion on img (xfs images): the claim grows while MariaDB runs; df in the container shows it; writes pass the old size"
s0=$SECONDS
has_resizer="$(k get ds -n "$NS" hostpath-csi-node -o json | jq -r '[.spec.template.spec.containers[].name] | index("csi-resizer") != null')"
if [[ $has_resizer != true ]]; then
  log "SKIP: deploy/'s DaemonSet has no csi-resizer container, so nothing acts on a resized claim"
  echo "SKIP: $current (deploy/ has no csi-resizer)"
  current=""
else
  claim mysql-img img 300Mi
  db_apply db3 mysql-img
  wait_for 240 "MariaDB on the img claim Ready" db_ready db3
  pod="$(db_pod db3)"
  df_bytes() { a exec "$pod" -- df -B1 --output=size /var/lib/mysql | tail -n 1 | tr -d ' '; }
  before="$(df_bytes)"
  ((before < 300 * 1048576)) || fail "df shows $before bytes on a 300Mi xfs volume"
  a patch pvc mysql-img --type merge -p '{"spec":{"resources":{"requests":{"storage":"600Mi"}}}}' >/dev/null
  grown() { (($(df_bytes) > 500 * 1048576)); }
  wait_for 180 "df in the database container to show the new size" grown
  [[ "$(db_pod db3)" == "$pod" ]] || fail "the database pod was replaced during expansion"
  resized() { [[ "$(a get pvc mysql-img -o jsonpath='{.status.capacity.storage}')" == 600Mi ]]; }
  wait_for 60 "the claim's status to show 600Mi" resized
  # Write past the old size (a file the database does not know about).
  a exec "$pod" -- dd if=/dev/zero of=/var/lib/mysql/fill bs=1M count=350 status=none ||
    fail "writing 350 MiB into the grown volume failed"
  a exec "$pod" -- rm /var/lib/mysql/fill
  wait_for 60 "the client pod" client_ready db3
  sql db3 'CREATE TABLE t (n INT); INSERT INTO t VALUES (7)'
  [[ "$(sql db3 'SELECT SUM(n) FROM t')" == 7 ]] || fail "the database does not work after the expansion"
  log "  df: $before bytes before, $(df_bytes) after"
  a delete deployment db3 --wait=true >/dev/null
  a delete pod db3-client --wait=false >/dev/null
  pass
fi

# ------------------------------------------------------------------ 4 two nodes
if ((NODES >= 2)); then
  scenario "4 two nodes: a claim that fits only node 2's ssd pool is scheduled and provisioned there; node 1 never sees it"
  s0=$SECONDS
  claim big-ssd ssd 1536Mi
  a apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: big}
spec:
  terminationGracePeriodSeconds: 0
  containers:
    - name: c
      image: docker.io/library/busybox:1.37
      imagePullPolicy: Never
      command: ["sh", "-c", "echo on-node-2 >/data/where && sleep 3600"]
      volumeMounts: [{name: v, mountPath: /data}]
  volumes: [{name: v, persistentVolumeClaim: {claimName: big-ssd}}]
EOF
  big_running() { [[ "$(a get pod big -o jsonpath='{.status.phase}')" == Running ]]; }
  wait_for 180 "the pod of the 1536Mi ssd claim Running" big_running
  [[ "$(pod_node big)" == "$NODE2_NAME" ]] || fail "the pod runs on $(pod_node big), not on $NODE2_NAME"
  pv="$(pv_of big-ssd)"
  got="$(k get pv "$pv" -o jsonpath='{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}')"
  [[ $got == "$NODE2_NAME" ]] || fail "PV $pv is pinned to '$got'"
  wait_for 30 "the pod's file in node 2's ssd pool" node_exec 2 grep -q on-node-2 "/var/lib/hostpath-csi/ssd/$pv/where"
  [[ ! -e /var/lib/hostpath-csi/ssd/$pv ]] || fail "node 1's ssd pool has $pv"
  # A pod put on node 1 by hand (no scheduler) cannot reach the volume:
  # node 1's driver has no such volume, so the kubelet never mounts it.
  a apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: big-on-node-1}
spec:
  nodeName: $NODE1_NAME
  terminationGracePeriodSeconds: 0
  containers:
    - name: c
      image: docker.io/library/busybox:1.37
      imagePullPolicy: Never
      command: ["sleep", "3600"]
      volumeMounts: [{name: v, mountPath: /data}]
  volumes: [{name: v, persistentVolumeClaim: {claimName: big-ssd}}]
EOF
  failed_mount() {
    a get events --field-selector involvedObject.name=big-on-node-1,reason=FailedMount -o name | grep -q .
  }
  wait_for 120 "a FailedMount event for the pod on node 1" failed_mount
  [[ "$(a get pod big-on-node-1 -o jsonpath='{.status.phase}')" != Running ]] || fail "the pod on node 1 is Running"
  log "  node 1: $(a get events --field-selector involvedObject.name=big-on-node-1,reason=FailedMount -o jsonpath='{.items[0].message}' | cut -c1-200)"
  a delete pod big big-on-node-1 --wait=true >/dev/null
  a delete pvc big-ssd --wait=true >/dev/null
  wait_for 120 "PV $pv deleted" pv_gone "$pv"
  node_exec 2 test ! -e "/var/lib/hostpath-csi/ssd/$pv" || fail "node 2's ssd pool still has $pv"
  pass
fi

# ------------------------------------------------------------------ 5 snapshots
# shellcheck source=tests/e2e/pods/snapshots.sh
source "$here/pods/snapshots.sh"
# shellcheck source=tests/e2e/pods/orphans.sh
source "$here/pods/orphans.sh"
# shellcheck source=tests/e2e/pods/ephemeral.sh
source "$here/pods/ephemeral.sh"

log "all scenarios done after $((SECONDS - t0)) s"
echo "e2e: $passed passed, $failed failed"
