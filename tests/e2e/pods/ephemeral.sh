# Scenario 7 of tests/e2e/pods.sh (sourced by it: its cluster, helpers and
# namespace): CSI inline ephemeral volumes on real pods, with
# deploy/examples/ephemeral.yaml applied as a user applies it.
#
#   - as written (pool ssd, a dir pool that serves no inline volumes in
#     this cluster): the pod does not start, its events say why and name
#     the pool that does (img), and nothing is made on its node;
#   - on img (xfs images, opened with `ephemeral = true` and
#     `max_ephemeral_volume_size = "512Mi"` in tests/e2e/pods/configmap.yaml),
#     with the example's 1Gi: refused the same way, the limit named;
#   - on img with 400Mi: the pod runs and writes into its volume; the data
#     is in the img pool's dir on its node; `hostpath-csi volumes` in the
#     node plugin's pod there lists the volume as ephemeral, made for the
#     pod; the size is enforced (df shows it, a write past it fails with
#     the pod still running);
#   - the pod deleted: the volume, its image and its data are gone from the
#     node (no mount, no loop device).
#
# Only the pod's name, `pool` and `size` are replaced; nothing else.

eph_example() { # NAME POOL SIZE: deploy/examples/ephemeral.yaml as the test applies it
  local f="$repo/deploy/examples/ephemeral.yaml"
  # The lines the test replaces must be there: an edited example fails
  # here rather than being applied half-replaced.
  grep -q '^  name: scratch$' "$f" && grep -q '^          pool: ssd$' "$f" && grep -q '^          size: 1Gi$' "$f" ||
    fail "ephemeral.yaml: no pod 'scratch' with pool ssd and size 1Gi"
  sed -e "s|^  name: scratch\$|  name: $1|" -e "s|^          pool: ssd\$|          pool: $2|" \
    -e "s|^          size: 1Gi\$|          size: $3|" "$f"
}
# eph_volumes NODE_NAME: the inline volumes `hostpath-csi volumes -o json`
# lists in the node plugin's pod on that node, one JSON object a line.
eph_volumes() {
  k exec -n "$NS" "$(eph_plugin "$1")" -c hostpath-csi -- hostpath-csi volumes -o json |
    jq -c '.pools[].volumes[] | select(.origin == "ephemeral")'
}
eph_plugin() { # NODE_NAME: the node plugin's pod there
  local plugin
  plugin="$(k get pods -n "$NS" -l app.kubernetes.io/name=hostpath-csi-node \
    --field-selector "spec.nodeName=$1" -o jsonpath='{.items[0].metadata.name}')"
  [[ -n $plugin ]] || fail "no node plugin pod on $1"
  echo "$plugin"
}
eph_phase() { a get pod "$1" -o jsonpath='{.status.phase}'; }
eph_scheduled() { [[ -n "$(pod_node "$1")" ]]; }
# eph_refused POD TEXT: the pod stays in ContainerCreating with a
# FailedMount event saying TEXT, and its node makes no inline volume.
eph_refused() {
  local pod="$1" text="$2" node
  said() {
    a get events --field-selector "involvedObject.name=$pod,reason=FailedMount" \
      -o jsonpath='{range .items[*]}{.message}{"\n"}{end}' | grep -q "$text"
  }
  wait_for 120 "a FailedMount event on $pod saying '$text'" said
  log "  $pod: $(a get events --field-selector "involvedObject.name=$pod,reason=FailedMount" \
    -o jsonpath='{.items[0].message}' | sed 's/.*desc = //' | cut -c1-220)"
  [[ "$(eph_phase "$pod")" == Pending ]] || fail "$pod is $(eph_phase "$pod"), not Pending"
  # The kubelet posts the event before the pod's status: wait for that.
  creating() { [[ "$(a get pod "$pod" -o jsonpath='{.status.containerStatuses[0].state.waiting.reason}')" == ContainerCreating ]]; }
  wait_for 30 "$pod shown waiting in ContainerCreating" creating
  node="$(pod_node "$pod")"
  [[ -z "$(eph_volumes "$node")" ]] || fail "$node made an inline volume for the refused $pod: $(eph_volumes "$node")"
  a delete pod "$pod" --wait=true >/dev/null
}

scenario "7 inline ephemeral volumes: deploy/examples/ephemeral.yaml on real pods; refused pools and sizes say why; the size enforced; deleting the pod removes the volume"
s0=$SECONDS

# The example as written: pool ssd is not opened to inline volumes here.
eph_example scratch-ssd ssd 1Gi | a apply -f - >/dev/null
wait_for 60 "scratch-ssd scheduled" eph_scheduled scratch-ssd
eph_refused scratch-ssd 'InvalidArgument desc = pool ssd does not serve inline ephemeral volumes.*(on this node: img)'

# On img, which serves them up to 512Mi, the example's 1Gi is too large.
eph_example scratch-big img 1Gi | a apply -f - >/dev/null
wait_for 60 "scratch-big scheduled" eph_scheduled scratch-big
eph_refused scratch-big "InvalidArgument desc = volume attribute size asks for 1073741824 bytes, but inline ephemeral volumes of pool img are at most 536870912 bytes"

# On img with 400Mi: it runs.
eph_example scratch img 400Mi | a apply -f - >/dev/null
eph_running() { [[ "$(eph_phase scratch)" == Running ]]; }
wait_for 180 "the pod of ephemeral.yaml Running on img" eph_running
node="$(pod_node scratch)"
ni="$(node_index "$node")"   # snapshots.sh's, sourced before
# Its command wrote /scratch/hello once df had run.
wrote() { a exec scratch -- cat /scratch/hello | grep -qx hello; }
wait_for 30 "the pod's /scratch/hello" wrote
vols="$(eph_volumes "$node")"
[[ $(grep -c . <<<"$vols") == 1 ]] || fail "node $node lists inline volumes: '$vols'"
[[ "$(jq -r '"\(.pod) \(.pool) \(.kind) \(.capacity_bytes) \(.size_enforced)"' <<<"$vols")" == \
  "$APP/scratch img image $((400 << 20)) true" ]] ||
  fail "hostpath-csi volumes on $node shows the inline volume as $vols"
target="$(jq -r '.published_at[] | select(endswith("/volumes/kubernetes.io~csi/scratch/mount"))' <<<"$vols")"
[[ $(grep -c . <<<"$target") == 1 ]] || fail "the inline volume is not published at the pod's target: $vols"
vol_path="$(jq -r .path <<<"$vols")"
token="$(basename "$vol_path")"
[[ $vol_path == "/var/lib/hostpath-csi/img/$token" ]] || fail "the inline volume is at $vol_path, not in the img pool"
# The data: in the image file in the img pool's dir on the node, whose
# filesystem the node plugin mounted at the volume's path (in its own mount
# namespace: the pools are HostToContainer) and the kubelet's target shows.
node_exec "$ni" test -s "/var/lib/hostpath-csi/img/.$token.img" || fail "no image .$token.img in node $ni's img pool"
[[ "$(k exec -n "$NS" "$(eph_plugin "$node")" -c hostpath-csi -- cat "$vol_path/hello")" == hello ]] ||
  fail "the pod's file is not in $vol_path in the node plugin on $node"
node_exec "$ni" grep -qx hello "$target/hello" || fail "the pod's file is not at its target $target on $node"
log "  $(jq -r .id <<<"$vols") on $node: made for pod $APP/scratch, $(jq -r .capacity_bytes <<<"$vols") bytes, enforced, its file in .$token.img"
# The size is enforced: the filesystem is smaller than 400Mi (xfs keeps
# some), and writing 500 MiB stops short with ENOSPC.
df_kib="$(a exec scratch -- df -k /scratch | awk 'END {print $2}')"
((df_kib > 0 && df_kib <= 400 * 1024)) || fail "df in the pod shows $df_kib KiB for a 400Mi volume"
if a exec scratch -- dd if=/dev/zero of=/scratch/fill bs=1M count=500 2>"$CLUSTER_DIR/logs/eph-dd.log"; then
  fail "a 500 MiB write into the 400Mi inline volume succeeded"
fi
grep -qi 'no space' "$CLUSTER_DIR/logs/eph-dd.log" || fail "the write failed otherwise: $(cat "$CLUSTER_DIR/logs/eph-dd.log")"
filled="$(a exec scratch -- stat -c %s /scratch/fill)"
((filled < 400 << 20)) || fail "$filled bytes written into a 400Mi volume"
[[ "$(eph_phase scratch)" == Running ]] || fail "the pod stopped after its volume filled up"
log "  df: $df_kib KiB; a 500 MiB write stopped at $((filled >> 20)) MiB: $(tail -n 1 "$CLUSTER_DIR/logs/eph-dd.log")"

# Deleting the pod removes the volume and its data from the node.
a delete pod scratch --grace-period=1 --wait=true >/dev/null
eph_gone() { [[ -z "$(eph_volumes "$node")" ]]; }
wait_for 60 "the inline volume gone from $node's listing" eph_gone
left="$(node_exec "$ni" ls -A /var/lib/hostpath-csi/img | grep -F "$token")" &&
  fail "left in node $ni's img pool: $left"
k exec -n "$NS" "$(eph_plugin "$node")" -c hostpath-csi -- cat /proc/self/mountinfo | grep -F "$token" &&
  fail "a mount of $token is left in the node plugin on $node"
target_gone() { node_exec "$ni" test ! -e "$target"; }
wait_for 60 "the pod's target $target gone from $node" target_gone
losetup -rn -O BACK-FILE | grep -F "$token" && fail "a loop device of $token is left"
pass
