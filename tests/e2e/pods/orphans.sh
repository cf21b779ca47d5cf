# Scenario 6 of tests/e2e/pods.sh (sourced by it: its cluster, helpers and
# namespace): issue 12's orphan story on the kubelet cluster, told by the
# DaemonSet's own driver (its orphan scan is quickened by
# tests/e2e/pods/orphan-scan.yaml: every 5 s, volumes without a PV count
# once 20 s old).
#
# Four dynamic claims on node 1's hdd pool, used by real pods:
#   - orph-gone: its pod goes, then its PV is deleted by hand with the
#     finalizers stripped (no DeleteVolume): the data stays on the node,
#     and the driver reports it `no_pv`: a Warning Event OrphanVolume on the
#     claim (now Lost), the orphan metrics scraped from the driver's metrics
#     port, and `hostpath-csi orphans` run in the driver's container;
#   - orph-kept (a Retain class): its pod and claim go, its PV is Released:
#     reported `released`, the Event on the PV;
#   - orph-idle: bound, its pod gone: `unused` once past --unused-after
#     (given 1s to the command), never reclaimed;
#   - orph-bound: bound, its pod still running: never reported.
# Then `hostpath-csi orphans --reclaim --grace 0s` in the driver's container:
# the dry run removes nothing; with --yes exactly orph-gone's and
# orph-kept's volumes go, through the driver's DeleteVolume; the others keep
# their data, the running pod still reads its file, and the next scans count
# no `no_pv` or `released` orphan.

scenario "6 orphans: a PV deleted by hand and a released Retain PV are reported by the DaemonSet's driver (Event, metrics, hostpath-csi orphans) and reclaimed; bound volumes stay"
s0=$SECONDS
hdd1=/var/lib/hostpath-csi/hdd # node 1's hdd pool, seen from the host

k apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: orphans-retain}
provisioner: hostpath-csi.dev
parameters: {pool: hdd}
reclaimPolicy: Retain
volumeBindingMode: WaitForFirstConsumer
EOF
claim orph-gone hdd 16Mi
claim orph-kept orphans-retain 16Mi
claim orph-idle hdd 16Mi
claim orph-bound hdd 16Mi
# user_pod NAME CLAIM...: a pod on node 1 that writes its claim's name into
# each volume (/v/<claim>/marker), then sleeps.
user_pod() {
  local name="$1" c mounts="" vols=""
  shift
  for c in "$@"; do
    mounts+="        - {name: $c, mountPath: /v/$c}"$'\n'
    vols+="    - {name: $c, persistentVolumeClaim: {claimName: $c}}"$'\n'
  done
  a apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $name}
spec:
  nodeSelector: {kubernetes.io/hostname: $NODE1_NAME}
  terminationGracePeriodSeconds: 0
  containers:
    - name: c
      image: docker.io/library/busybox:1.37
      imagePullPolicy: Never
      command: ["sh", "-c", "for d in /v/*; do basename \$d >\$d/marker; done; sleep 3600"]
      volumeMounts:
$mounts
  volumes:
$vols
EOF
}
user_pod orph-user orph-gone orph-kept orph-idle
user_pod orph-keeper orph-bound
declare -A orph_pv=()
for c in orph-gone orph-kept orph-idle orph-bound; do
  wait_for 180 "claim $c Bound" pvc_bound "$c"
  orph_pv[$c]="$(pv_of "$c")"
  wait_for 120 "$c's marker in node 1's hdd pool" grep -qx "$c" "$hdd1/${orph_pv[$c]}/marker"
done
[[ "$(k get pv "${orph_pv[orph-gone]}" -o jsonpath='{.spec.capacity.storage}')" == 16Mi ]] ||
  fail "PV ${orph_pv[orph-gone]} is not of 16Mi"
a delete pod orph-user --wait=true >/dev/null
log "  volumes: $(for c in "${!orph_pv[@]}"; do printf '%s=%s ' "$c" "${orph_pv[$c]}"; done)"

# (a) The PV deleted by hand, its finalizers stripped: gone without a
# DeleteVolume. (b) The Retain claim deleted: its PV is Released.
gone="hdd:${orph_pv[orph-gone]}" kept="hdd:${orph_pv[orph-kept]}" idle="hdd:${orph_pv[orph-idle]}" bound="hdd:${orph_pv[orph-bound]}"
k delete pv "${orph_pv[orph-gone]}" --wait=false >/dev/null
k patch pv "${orph_pv[orph-gone]}" --type merge -p '{"metadata":{"finalizers":null}}' >/dev/null
wait_for 60 "PV ${orph_pv[orph-gone]} gone" pv_gone "${orph_pv[orph-gone]}"
a delete pvc orph-kept --wait=true >/dev/null
pv_released() { [[ "$(k get pv "$1" -o jsonpath='{.status.phase}')" == Released ]]; }
wait_for 60 "PV ${orph_pv[orph-kept]} Released" pv_released "${orph_pv[orph-kept]}"
[[ -f $hdd1/${orph_pv[orph-gone]}/marker && -f $hdd1/${orph_pv[orph-kept]}/marker ]] ||
  fail "the data of a volume whose PV was deleted or released is not on the node"

# The Events the driver's scan posts: on the claim while it exists (Lost,
# for orph-gone), else on the PV (namespace default).
orphan_events() { # NAMESPACE KIND NAME
  k get events -n "$1" --field-selector "involvedObject.kind=$2,involvedObject.name=$3,reason=OrphanVolume" \
    -o jsonpath='{range .items[*]}{.type} {.count}: {.message}{"\n"}{end}'
}
event_says() { orphan_events "$1" "$2" "$3" | grep -q "^Warning 1: volume $4 on node $NODE1_NAME (16777216 bytes, .*$5"; }
wait_for 90 "the OrphanVolume Event on claim orph-gone" \
  event_says "$APP" PersistentVolumeClaim orph-gone "$gone" 'no PersistentVolume names this volume'
wait_for 90 "the OrphanVolume Event on PV ${orph_pv[orph-kept]}" \
  event_says default PersistentVolume "${orph_pv[orph-kept]}" "$kept" 'Released'
log "  Event on claim orph-gone: $(orphan_events "$APP" PersistentVolumeClaim orph-gone | cut -c1-200)"
for c in orph-idle orph-bound; do
  [[ -z "$(orphan_events "$APP" PersistentVolumeClaim "$c")" ]] || fail "an OrphanVolume Event on claim $c, which is bound"
done

# The metrics, scraped from node 1 on the driver pod's metrics port.
driver_pod="$(k get pods -n "$NS" -l app.kubernetes.io/name=hostpath-csi-node \
  --field-selector "spec.nodeName=$NODE1_NAME" -o jsonpath='{.items[0].metadata.name}')"
port="$(k get pod -n "$NS" "$driver_pod" -o jsonpath='{.spec.containers[?(@.name=="hostpath-csi")].ports[?(@.name=="metrics")].containerPort}')"
metrics_url="http://$(k get pod -n "$NS" "$driver_pod" -o jsonpath='{.status.podIP}'):$port/metrics"
metric() { curl -fsS --max-time 10 "$metrics_url" | awk -v m="$1" '$1 == m { print $2 }'; }
metric_is() { [[ "$(metric "$1")" == "$2" ]]; }
for r in no_pv released; do
  wait_for 60 "hostpath_csi_orphan_volumes{reason=\"$r\"} 1 at $metrics_url" \
    metric_is "hostpath_csi_orphan_volumes{reason=\"$r\"}" 1
  metric_is "hostpath_csi_orphan_bytes{reason=\"$r\"}" 16777216 ||
    fail "orphan bytes for $r: '$(metric "hostpath_csi_orphan_bytes{reason=\"$r\"}")', not 16777216"
done
log "  $metrics_url: $(curl -fsS "$metrics_url" | grep -E '^hostpath_csi_orphan_volumes' | tr '\n' ' ')"

# `hostpath-csi orphans` in the driver's container. It takes serve's flags,
# not the DaemonSet's arguments: the settle time is given again, and
# --unused-after 1s makes orph-idle (bound, no pod) an `unused` orphan.
orphans() { k exec -n "$NS" "$driver_pod" -c hostpath-csi -- hostpath-csi orphans --orphan-settle=20s --unused-after=1s "$@"; }
report="$(orphans -o json)" || fail "hostpath-csi orphans -o json failed"
ids() { jq -c --arg r "$1" '[.orphans[] | select(.reason == $r) | .volume_id] | sort' <<<"$report"; }
[[ "$(ids no_pv)" == "[\"$gone\"]" ]] || fail "no_pv orphans: $(ids no_pv), not [$gone]"
[[ "$(ids released)" == "[\"$kept\"]" ]] || fail "released orphans: $(ids released), not [$kept]"
jq -e --arg v "$idle" '.orphans[] | select(.volume_id == $v and .reason == "unused") | .keep | test("is Bound: it could be used again")' <<<"$report" >/dev/null ||
  fail "$idle is not an unused orphan kept from reclaim: $report"
jq -e --arg v "$bound" 'all(.orphans[]; .volume_id != $v)' <<<"$report" >/dev/null || fail "$bound, used by a running pod, is reported"
jq -e --arg g "$gone" --arg c "$APP/orph-gone" \
  '.orphans[] | select(.volume_id == $g) | .claim == $c and .bytes == 16777216 and .keep == null and .origin == "driver" and (.idle_seconds | type == "number")' \
  <<<"$report" >/dev/null || fail "the no_pv orphan's claim, size, origin or idle time: $report"
[[ "$(jq -c '.reclaimable' <<<"$report")" == '[]' ]] || fail "reclaimable under the default 24h grace: $(jq -c .reclaimable <<<"$report")"
table="$(orphans)" || fail "hostpath-csi orphans failed"
grep -Eq "^no_pv +$gone +${orph_pv[orph-gone]} +$APP/orph-gone +$NODE1_NAME +16 MiB +[0-9]+[sm] +after the grace period" <<<"$table" ||
  fail "the table has no no_pv row for $gone: $table"
grep -Eq "^released +$kept +${orph_pv[orph-kept]} +$APP/orph-kept +$NODE1_NAME +16 MiB" <<<"$table" ||
  fail "the table has no released row for $kept: $table"
log "  hostpath-csi orphans in $driver_pod:"
sed 's/^/    /' <<<"$table" >&2

# (c) Reclaim with no grace period: first a dry run, then for real.
out="$(orphans --reclaim --grace 0s)" || fail "hostpath-csi orphans --reclaim (dry run) failed: $out"
grep -qx "reclaim (dry run): would reclaim 2 volume(s): $gone $kept; add --yes to reclaim them" <<<"$out" ||
  fail "the dry run says: $(tail -n 1 <<<"$out")"
[[ -f $hdd1/${orph_pv[orph-gone]}/marker && -f $hdd1/${orph_pv[orph-kept]}/marker ]] || fail "the dry run removed data"
out="$(orphans --reclaim --grace 0s --yes)" || fail "hostpath-csi orphans --reclaim --yes failed: $out"
grep -qx "reclaimed $gone" <<<"$out" && grep -qx "reclaimed $kept" <<<"$out" ||
  fail "reclaim says: $(grep -E 'reclaim|left alone' <<<"$out")"
for c in orph-gone orph-kept; do
  [[ ! -e $hdd1/${orph_pv[$c]} ]] || fail "the volume of $c is still in node 1's hdd pool after the reclaim"
done
for c in orph-idle orph-bound; do
  grep -qx "$c" "$hdd1/${orph_pv[$c]}/marker" || fail "the reclaim touched $c's data"
  pvc_bound "$c" || fail "claim $c is no longer Bound after the reclaim"
done
[[ "$(a exec orph-keeper -- cat /v/orph-bound/marker)" == orph-bound ]] || fail "the running pod cannot read its volume after the reclaim"
listed="$(k exec -n "$NS" "$driver_pod" -c hostpath-csi -- hostpath-csi volumes -o json --no-usage |
  jq -c '[.pools[] | select(.name == "hdd") | .volumes[].id]')"
for v in "$gone" "$kept"; do
  ! jq -e --arg v "$v" 'index($v) != null' <<<"$listed" >/dev/null || fail "hostpath-csi volumes still lists $v"
done
# The next scans find nothing left to report of either reason.
for r in no_pv released; do
  wait_for 60 "hostpath_csi_orphan_volumes{reason=\"$r\"} 0" metric_is "hostpath_csi_orphan_volumes{reason=\"$r\"}" 0
done
# The scan ran with deploy/'s RBAC and was never refused.
if k logs -n "$NS" "$driver_pod" -c hostpath-csi | grep -E 'orphan scan failed|forbidden' >&2; then
  fail "the driver's orphan scan failed (above)"
fi

# What is left: the Retain PV object (its volume reclaimed), the Lost claim,
# the bound claims and their pod.
a delete pod orph-keeper --wait=true >/dev/null
a delete pvc orph-gone orph-idle orph-bound --wait=true >/dev/null
k delete pv "${orph_pv[orph-kept]}" --wait=true >/dev/null
for c in orph-idle orph-bound; do
  wait_for 120 "PV ${orph_pv[$c]} deleted" pv_gone "${orph_pv[$c]}"
  [[ ! -e $hdd1/${orph_pv[$c]} ]] || fail "the volume of $c is still in node 1's hdd pool"
done
k delete storageclass orphans-retain >/dev/null
pass
