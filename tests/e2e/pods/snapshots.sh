# Scenario 5 of tests/e2e/pods.sh (sourced by it: its cluster, helpers and
# namespace): snapshots, restores and clones on real pods, with the
# examples of deploy/examples applied as a user applies them.
#
#   - mysql.yaml: the database on an `ssd` claim, rows written;
#   - snapshot-restore.yaml (NODE = the claim's node): a VolumeSnapshot,
#     made by the csi-snapshotter on that node, readyToUse; a claim restored
#     from it, used by a second database that finds the rows as they were
#     at the snapshot (rows written since are not there);
#   - clone.yaml: a clone of the claim, with the rows as they are now;
#   - with two nodes, the clone and (after the source claim is deleted:
#     its volume goes, the snapshot stays) the restore again, each with its
#     pod on the other node: the claim's events say why, the claim is
#     handed back to the scheduler rather than stuck there, and once the
#     pod gets the source's node, as the examples say, it runs there;
#   - the VolumeSnapshot deleted: its data goes from the node.
#
# The examples run the upstream `mysql:8.4` image and ask for 5Gi; the
# cluster pulls nothing, so the test's MariaDB image stands in for it (the
# same data directory, the example's Secret unused), and the claims ask for
# 256Mi of the test's tmpfs pools. Nothing else is changed.

example() { # FILE [NODE]: deploy/examples/FILE as the test applies it
  local f="$repo/deploy/examples/$1"
  # The lines the test replaces must be there: an edited example fails
  # here rather than being applied half-replaced.
  if grep -q 'image: mysql:' "$f"; then grep -q 'image: mysql:8.4$' "$f" || fail "$1: another mysql image"; fi
  grep -q 'storage: 5Gi$' "$f" || fail "$1 asks for no 5Gi"
  sed -e 's|image: mysql:8.4$|image: hostpath-csi.dev/e2e/mariadb:10.11|' \
    -e 's|storage: 5Gi$|storage: 256Mi|' \
    -e "s|kubernetes.io/hostname: NODE\$|kubernetes.io/hostname: ${2:-NODE}|" "$f"
}
# q DEPLOYMENT SQL: SQL as root through the server's own socket in the
# Deployment's running pod (the examples' databases have no Service).
q() { a exec "$(db_pod "$1")" -- mariadb -N -B app -e "$2"; }
sum_is() { [[ "$(q "$1" 'SELECT SUM(n) FROM t')" == "$2" ]]; }
db_gone() { ! a get pods -l "app=$1" -o name | grep -q .; }
scale_to_zero() { # DEPLOYMENT: and wait until its pod has released the volume
  a scale deployment "$1" --replicas=0 >/dev/null
  wait_for 120 "the $1 pod gone" db_gone "$1"
}
pv_node() { k get pv "$1" -o jsonpath='{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}'; }
node_index() { if [[ $1 == "${NODE2_NAME:-}" ]]; then echo 2; else echo 1; fi; }
snap_ready() { [[ "$(a get volumesnapshot "$1" -o jsonpath='{.status.readyToUse}')" == true ]]; }
claim_events() { # CLAIM REASON: the messages of the claim's events of that reason
  a get events --field-selector "involvedObject.kind=PersistentVolumeClaim,involvedObject.name=$1,reason=$2" \
    -o jsonpath='{range .items[*]}{.message}{"\n"}{end}'
}

# sent_back CLAIM POD TEXT: what a user sees when POD, which makes CLAIM
# from a source on another node, was put on the wrong node: the claim stays
# Pending with a ProvisioningFailed event saying TEXT, and the pod Pending.
# That the claim was handed back (csi-provisioner takes the selected node off
# it on RESOURCE_EXHAUSTED) is shown by what follows: once the pod is given
# the right node, it runs there. A claim that kept the wrong node is the
# reference driver's issue #651: no later pod of the claim could run, even
# on the right node. (The scheduler's FailedScheduling event "selectedNode
# annotation reset" was not seen within 120 s in the one run that waited for
# it, 2026-12-02; not asserted until that is understood.)
sent_back() {
  local claim="$1" pod="$2" text="$3"
  said() { claim_events "$claim" ProvisioningFailed | grep -q "$text"; }
  wait_for 120 "an event on $claim: '$text'" said
  log "  $claim with its pod on $other: $(claim_events "$claim" ProvisioningFailed | grep -m1 "$text" | sed 's/.*desc = //' | cut -c1-200)"
  [[ "$(a get pvc "$claim" -o jsonpath='{.status.phase}')" == Pending ]] || fail "$claim is not Pending"
  [[ "$(a get pod "$pod" -o jsonpath='{.status.phase}')" == Pending ]] || fail "the pod $pod on the wrong node is not Pending"
}

scenario "5 snapshots: deploy/examples' snapshot, restore and clone of the MySQL claim on real pods; a restore on the wrong node; the source deleted"
s0=$SECONDS

# The database of mysql.yaml, with rows.
example mysql.yaml | a apply -f - >/dev/null
wait_for 240 "the database of mysql.yaml answering" q mysql 'SELECT 1'
q mysql 'CREATE TABLE t (id INT PRIMARY KEY AUTO_INCREMENT, n INT NOT NULL); INSERT INTO t (n) VALUES (1), (2), (3)'
src_pv="$(pv_of mysql-data)"
node="$(pv_node "$src_pv")"
ni="$(node_index "$node")"
other=""
((NODES < 2)) || { other="$NODE1_NAME"; [[ $node == "$NODE1_NAME" ]] && other="$NODE2_NAME"; }
[[ "$(pod_node "$(db_pod mysql)")" == "$node" ]] || fail "the database does not run on its volume's node $node"
log "  mysql-data is $src_pv on $node"

# snapshot-restore.yaml, NODE replaced by the claim's node. A dir pool's
# snapshot is a file-by-file copy, so the example says to stop writes
# first: the database is scaled to 0 while the snapshot is taken.
scale_to_zero mysql
example snapshot-restore.yaml "$node" | a apply -f - >/dev/null
wait_for 120 "VolumeSnapshot mysql-data-snap readyToUse" snap_ready mysql-data-snap
content="$(a get volumesnapshot mysql-data-snap -o jsonpath='{.status.boundVolumeSnapshotContentName}')"
handle="$(k get volumesnapshotcontent "$content" -o jsonpath='{.status.snapshotHandle}')"
# Distributed snapshotting: the content was given to the source's node.
managed="$(k get volumesnapshotcontent "$content" -o jsonpath='{.metadata.labels.snapshot\.storage\.kubernetes\.io/managed-by}')"
[[ $managed == "$node" ]] || fail "content $content is managed by '$managed', not by the source's node $node"
token="$(cut -d@ -f2 <<<"$handle")"
[[ $handle == ssd@* ]] || fail "snapshot handle '$handle' is not in the ssd pool"
node_exec "$ni" test -d "/var/lib/hostpath-csi/ssd/.snapshots/$token/data/app" ||
  fail "the snapshot $handle holds no database in node $ni's ssd pool"
log "  snapshot $handle ready ($(a get volumesnapshot mysql-data-snap -o jsonpath='{.status.restoreSize}'))"
# The source changes after the snapshot.
a scale deployment mysql --replicas=1 >/dev/null
wait_for 180 "the database of mysql.yaml back" q mysql 'SELECT 1'
q mysql 'INSERT INTO t (n) VALUES (4)'
# The restored database has the rows of the snapshot, on the source's node.
wait_for 240 "the restored database answering" q mysql-restored 'SELECT 1'
sum_is mysql-restored 6 || fail "the restored database has '$(q mysql-restored 'SELECT SUM(n) FROM t')', not the snapshot's 6"
[[ "$(pod_node "$(db_pod mysql-restored)")" == "$node" ]] || fail "the restored database does not run on $node"
restored_pv="$(pv_of mysql-data-restored)"
[[ "$(pv_node "$restored_pv")" == "$node" ]] || fail "the restored volume is not on $node"
q mysql-restored 'INSERT INTO t (n) VALUES (100)'
sum_is mysql 10 || fail "a write to the restored database reached its source"
log "  restored: $restored_pv on $node has the snapshot's rows"

# clone.yaml, of the claim as it is now (writes stopped, as for the
# snapshot): its pod lists the files; a database on the clone has every row.
scale_to_zero mysql
example clone.yaml "$node" | a apply -f - >/dev/null
inspect_done() { a logs inspect-clone 2>/dev/null | grep -q ' data$'; }
wait_for 180 "the pod of clone.yaml listing the clone's files" inspect_done
[[ "$(pod_node inspect-clone)" == "$node" ]] || fail "inspect-clone does not run on $node"
clone_pv="$(pv_of mysql-data-clone)"
[[ "$(pv_node "$clone_pv")" == "$node" ]] || fail "the clone is not on $node"
# Its shell ignores SIGTERM: it goes after its grace period, meanwhile
# both pods share the volume on the node (ReadWriteOnce allows that).
a delete pod inspect-clone --wait=false >/dev/null
db_apply dbclone mysql-data-clone
wait_for 240 "a database on the clone answering" q dbclone 'SELECT 1'
sum_is dbclone 10 || fail "the clone has '$(q dbclone 'SELECT SUM(n) FROM t')', not the source's 10"
log "  clone: $clone_pv on $node has the rows written since the snapshot"
a delete deployment dbclone mysql-restored --wait=true >/dev/null
a delete pod dbclone-client --wait=false >/dev/null
if [[ -n $other ]]; then
  # clone.yaml with the other node: that node's driver does not hold the
  # source, says so, and the claim is handed back; the pod made again with
  # the source's node (a pod's nodeSelector cannot be changed) runs there.
  clone2() { example clone.yaml "$1" | sed -e 's/mysql-data-clone/mysql-data-clone-2/g' -e 's/inspect-clone/inspect-clone-2/g'; }
  clone2 "$other" | a apply -f - >/dev/null
  sent_back mysql-data-clone-2 inspect-clone-2 'is not on node'
  t_fix=$SECONDS
  a delete pod inspect-clone-2 --wait=true >/dev/null
  clone2 "$node" | a apply -f - >/dev/null
  inspect2_done() { a logs inspect-clone-2 2>/dev/null | grep -q ' data$'; }
  wait_for 300 "the clone's pod, given the source's node, listing the clone's files" inspect2_done
  [[ "$(pod_node inspect-clone-2)" == "$node" ]] || fail "inspect-clone-2 does not run on $node"
  clone2_pv="$(pv_of mysql-data-clone-2)"
  [[ "$(pv_node "$clone2_pv")" == "$node" ]] || fail "the second clone is not on $node"
  log "  with the source's node: Running on $node $((SECONDS - t_fix)) s after the fix"
  a delete pod inspect-clone-2 --wait=false >/dev/null
  a delete pvc mysql-data-clone-2 --wait=false >/dev/null
fi

# The source goes: its volume is deleted, the snapshot stays (README).
a delete deployment mysql --wait=true >/dev/null
wait_for 120 "the database pod gone" db_gone mysql
a delete pvc mysql-data --wait=true >/dev/null
wait_for 120 "PV $src_pv deleted" pv_gone "$src_pv"
node_exec "$ni" test ! -e "/var/lib/hostpath-csi/ssd/$src_pv" || fail "the source's data is still in the pool"
node_exec "$ni" test -d "/var/lib/hostpath-csi/ssd/.snapshots/$token" || fail "the snapshot went with its source"
snap_ready mysql-data-snap || fail "the VolumeSnapshot is not ready after its source was deleted"

if [[ -n $other ]]; then
  # The restore again, as the example is written, but with the other node
  # in its nodeSelector: the scheduler puts the pod there, the driver there
  # answers RESOURCE_EXHAUSTED, csi-provisioner hands the claim back.
  example snapshot-restore.yaml "$other" |
    sed -e 's/mysql-data-restored/mysql-data-restored-2/g' -e 's/mysql-restored/mysql-restored-2/g' |
    a apply -f - >/dev/null
  sent_back mysql-data-restored-2 "$(a get pods -l app=mysql-restored-2 -o jsonpath='{.items[0].metadata.name}')" \
    'lives on another node'
  # Following the example: the pod gets the snapshot's node (the
  # Deployment's new pod replaces the one on the wrong node).
  t_fix=$SECONDS
  a patch deployment mysql-restored-2 --type merge \
    -p "{\"spec\":{\"template\":{\"spec\":{\"nodeSelector\":{\"kubernetes.io/hostname\":\"$node\"}}}}}" >/dev/null
  wait_for 300 "the restored database on $node answering" q mysql-restored-2 'SELECT 1'
  [[ "$(pod_node "$(db_pod mysql-restored-2)")" == "$node" ]] || fail "the restored database does not run on $node"
  sum_is mysql-restored-2 6 || fail "the second restore has '$(q mysql-restored-2 'SELECT SUM(n) FROM t')', not the snapshot's 6"
  log "  with the nodeSelector of the example: Running on $node $((SECONDS - t_fix)) s after the fix, with the snapshot's rows (its source deleted)"
  restored2_pv="$(pv_of mysql-data-restored-2)"
  [[ "$(pv_node "$restored2_pv")" == "$node" ]] || fail "the second restored volume is not on $node"
  a delete deployment mysql-restored-2 --wait=true >/dev/null
  wait_for 120 "the second restored database gone" db_gone mysql-restored-2
  a delete pvc mysql-data-restored-2 --wait=true >/dev/null
  wait_for 120 "PV $restored2_pv deleted" pv_gone "$restored2_pv"
fi

# Deleting the VolumeSnapshot (class deletionPolicy Delete) removes the
# snapshot from the node; deleting the claims removes their volumes.
a delete volumesnapshot mysql-data-snap --wait=true --timeout=60s >/dev/null || fail "deleting the VolumeSnapshot"
snapshot_gone() { node_exec "$ni" sh -c "test -z \"\$(ls -A /var/lib/hostpath-csi/ssd/.snapshots)\""; }
wait_for 60 "the snapshot's data gone from node $ni's ssd pool" snapshot_gone
a delete pvc mysql-data-restored mysql-data-clone --wait=true >/dev/null
wait_for 120 "PV $restored_pv deleted" pv_gone "$restored_pv"
wait_for 120 "PV $clone_pv deleted" pv_gone "$clone_pv"
[[ -z ${clone2_pv:-} ]] || wait_for 120 "PV $clone2_pv deleted" pv_gone "$clone2_pv"
pool_left() { node_exec "$ni" ls -A /var/lib/hostpath-csi/ssd | grep -E "$src_pv|$restored_pv|$clone_pv|^[^.]"; }
left="$(pool_left)" && fail "left in node $ni's ssd pool: $left"
# The sidecars ran with deploy/'s RBAC and were never refused.
for p in $(k get pods -n "$NS" -o name) ; do
  if k logs -n "$NS" "$p" -c csi-snapshotter | grep -i forbidden >&2; then fail "csi-snapshotter was refused access (above)"; fi
done
for p in $(k get pods -n kube-system -l app.kubernetes.io/name=snapshot-controller -o name); do
  if k logs -n kube-system "$p" | grep -i forbidden >&2; then fail "the snapshot controller was refused access (above)"; fi
done
pass
