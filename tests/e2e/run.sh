#!/usr/bin/env bash
# End-to-end test of hostpath-csi against real Kubernetes components.
#
# One command, run as root from anywhere:   tests/e2e/run.sh
#
# It builds (or takes from the cache, see build-tools.sh) etcd,
# kube-apiserver, kube-controller-manager, kubectl and csi-provisioner, builds
# hostpath-csi with `cargo build --release`, and starts on loopback only:
#   etcd -> kube-apiserver (RBAC, privileged pods allowed) -> kube-controller-manager
# then installs deploy/ with `kubectl apply -k`, creates a Node object for a
# fake node, and runs hostpath-csi plus csi-provisioner as host processes with
# the flags of the DaemonSet in deploy/ (paths rewritten into a temp dir, the
# API reached through a kubeconfig holding a token of the DaemonSet's
# ServiceAccount, so the RBAC rules in deploy/ are the ones tested).
# There is no kubelet or scheduler: the test sets the selected-node annotation
# that the scheduler would set, and the DaemonSet controller creates the node
# plugin's Pod object (never run), whose name csi-provisioner uses as POD_NAME.
#
# Storage pools are tmpfs mounts of different sizes so capacity is
# predictable. Every process, mount and temp dir is removed on exit, also on
# failure. Set E2E_KEEP=1 to keep the temp dir (logs) after a failure.
#
# Environment:
#   E2E_CACHE      build cache (default /var/cache/hostpath-csi-e2e)
#   E2E_SKIP_CARGO_BUILD=1  use the existing target/release/hostpath-csi
#   E2E_KEEP=1     keep the work dir on failure
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
t_start=$SECONDS

if [[ $(id -u) -ne 0 ]]; then
  echo "tests/e2e/run.sh must run as root (it mounts tmpfs pools)" >&2
  exit 1
fi

NODE=e2e-node-1
DRIVER=hostpath-csi.dev
TOPOLOGY_KEY=topology.hostpath-csi.dev/node
NS=hostpath-csi          # the namespace of deploy/
APP_NS=e2e               # where the test's claims live
HDD_SIZE_MI=96
SSD_SIZE_MI=48

W="$(mktemp -d /tmp/hostpath-csi-e2e.XXXXXX)"
chmod 0755 "$W"
declare -A PIDS=()
build_pid=""
passed=0
failed=0
current=""

log() { printf '[e2e %s] %s\n' "$(date +%T)" "$*" >&2; }

cleanup() {
  local rc=$?
  set +e
  [[ -n "${build_pid:-}" ]] && kill -- -"$build_pid" 2>/dev/null
  for name in "${!PIDS[@]}"; do
    kill "${PIDS[$name]}" 2>/dev/null
  done
  for name in "${!PIDS[@]}"; do
    # Give each process a moment to exit, then force it.
    for _ in $(seq 50); do kill -0 "${PIDS[$name]}" 2>/dev/null || break; sleep 0.1; done
    kill -9 "${PIDS[$name]}" 2>/dev/null
    wait "${PIDS[$name]}" 2>/dev/null
  done
  # Unmount everything under the work dir, deepest first.
  awk -v w="$W" '$5 == w || index($5, w "/") == 1 {print $5}' /proc/self/mountinfo |
    sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
  if ((rc != 0)) && [[ -n "${E2E_KEEP:-}" ]]; then
    log "kept $W (logs in $W/logs)"
  else
    rm -rf "$W"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

dump_logs() {
  local f
  if [[ -n "${KUBECTL:-}" && -n "${KUBECONFIG:-}" ]]; then
    "$KUBECTL" get events -A --sort-by=.lastTimestamp >"$W/logs/z-events.log" 2>&1
    "$KUBECTL" get ds,pods,pvc,pv,csistoragecapacities -A -o wide >"$W/logs/z-objects.log" 2>&1
  fi
  for f in "$W"/logs/*.log; do
    [[ -f "$f" ]] || continue
    echo "----- last lines of $(basename "$f") -----" >&2
    tail -n 25 "$f" >&2
  done
}

fail() {
  log "FAIL: ${current:-setup}: $*"
  echo "FAIL: ${current:-setup}: $*"
  failed=$((failed + 1))
  dump_logs
  echo "$passed passed, $failed failed"
  exit 1
}

# wait_for SECONDS DESCRIPTION CMD... : retry CMD every 0.5s until it succeeds.
wait_for() {
  local timeout="$1" what="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "timed out after ${timeout}s waiting for $what"
    sleep 0.5
  done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

sock_ready() { # PATH: a unix socket that accepts connections
  python3 -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])' "$1"
}

start() { # NAME CMD... : run CMD in the background, log to $W/logs/NAME.log
  local name="$1"; shift
  "$@" >"$W/logs/$name.log" 2>&1 &
  PIDS[$name]=$!
}

# supervise NAME CMD... : like start, but restart CMD whenever it exits, as
# the kubelet does for a container with restartPolicy Always. csi-provisioner
# needs it: it exits on purpose when it loses its connection to the driver.
supervise() {
  local name="$1"; shift
  (
    child=""
    trap '[[ -n "$child" ]] && kill "$child" 2>/dev/null; wait; exit 0' TERM
    n=0
    while true; do
      "$@" >>"$W/logs/$name.log" 2>&1 &
      child=$!
      wait "$child" || true
      n=$((n + 1))
      echo "$n" >"$W/$name.restarts"
      echo "=== e2e: $name exited; restart $n in 1s" >>"$W/logs/$name.log"
      sleep 1
    done
  ) &
  PIDS[$name]=$!
}
restarts() { cat "$W/$1.restarts" 2>/dev/null || echo 0; }

stop_hard() { # NAME : kill -9 and reap
  kill -9 "${PIDS[$1]}" 2>/dev/null || true
  wait "${PIDS[$1]}" 2>/dev/null || true
  unset "PIDS[$1]"
}

scenario() { current="$1"; log "=== $1"; }
pass() { log "PASS: $current"; echo "PASS: $current"; passed=$((passed + 1)); current=""; }

mkdir -p "$W/logs" "$W/pki" "$W/etcd"

# ---------------------------------------------------------------- build
log "building components (Go builds in the background, cargo in the foreground)"
# In its own process group, so that cleanup can stop the whole build.
setsid "$here/build-tools.sh" >"$W/tools.env" 2>"$W/logs/build-tools.log" &
build_pid=$!
if [[ -z "${E2E_SKIP_CARGO_BUILD:-}" ]]; then
  (cd "$repo" && cargo build --release --quiet) || fail "cargo build --release failed"
fi
HOSTPATH_CSI="${CARGO_TARGET_DIR:-$repo/target}/release/hostpath-csi"
[[ -x "$HOSTPATH_CSI" ]] || fail "no driver binary at $HOSTPATH_CSI"
wait "$build_pid" || { build_pid=""; cat "$W/logs/build-tools.log" >&2; fail "building the Go components failed"; }
build_pid=""
# shellcheck disable=SC1091
source "$W/tools.env"   # KUBE_APISERVER, KUBE_CONTROLLER_MANAGER, KUBECTL, ETCD, CSI_PROVISIONER
log "components ready after $((SECONDS - t_start))s"

# ---------------------------------------------------------------- PKI
# One CA signs everything: serving cert, client certs, cluster signing.
pki="$W/pki"
(
  cd "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=e2e-ca" \
    -keyout ca.key -out ca.crt 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  cert() { # NAME SUBJECT [SAN]
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
    if [[ -n "${3:-}" ]]; then
      printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$3" >"$1.ext"
    else
      printf 'extendedKeyUsage=clientAuth\n' >"$1.ext"
    fi
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 \
      -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  }
  cert apiserver "/CN=kube-apiserver" "IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes.default.svc"
  cert admin "/O=system:masters/CN=e2e-admin"
  cert kcm "/CN=system:kube-controller-manager"
) || fail "generating certificates failed"

ETCD_PORT=$(free_port); ETCD_PEER_PORT=$(free_port); API_PORT=$(free_port)
API="https://127.0.0.1:$API_PORT"

kubeconfig() { # FILE USER-ARGS...
  local f="$1"; shift
  "$KUBECTL" config --kubeconfig="$f" set-cluster e2e --server="$API" \
    --certificate-authority="$pki/ca.crt" --embed-certs >/dev/null
  "$KUBECTL" config --kubeconfig="$f" set-credentials u "$@" >/dev/null
  "$KUBECTL" config --kubeconfig="$f" set-context e2e --cluster=e2e --user=u >/dev/null
  "$KUBECTL" config --kubeconfig="$f" use-context e2e >/dev/null
}
kubeconfig "$W/admin.kubeconfig" --client-certificate="$pki/admin.crt" --client-key="$pki/admin.key" --embed-certs
kubeconfig "$W/kcm.kubeconfig" --client-certificate="$pki/kcm.crt" --client-key="$pki/kcm.key" --embed-certs
export KUBECONFIG="$W/admin.kubeconfig"
k() { "$KUBECTL" "$@"; }

# ---------------------------------------------------------------- control plane
log "starting etcd on 127.0.0.1:$ETCD_PORT"
start etcd "$ETCD" --name e2e --data-dir "$W/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "e2e=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync --log-level warn
wait_for 60 "etcd health" curl -sf "http://127.0.0.1:$ETCD_PORT/health"

log "starting kube-apiserver on $API"
start kube-apiserver "$KUBE_APISERVER" \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
  --endpoint-reconciler-type=none \
  --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" \
  --service-account-issuer=https://kubernetes.default.svc \
  --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
  --service-cluster-ip-range=10.0.0.0/24 \
  --authorization-mode=Node,RBAC --allow-privileged=true \
  --profiling=false --v=1
wait_for 120 "kube-apiserver /readyz" k get --raw /readyz

log "starting kube-controller-manager"
start kube-controller-manager "$KUBE_CONTROLLER_MANAGER" \
  --kubeconfig="$W/kcm.kubeconfig" \
  --authentication-kubeconfig="$W/kcm.kubeconfig" --authorization-kubeconfig="$W/kcm.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$(free_port)" \
  --controllers='*' --use-service-account-credentials=true --leader-elect=false \
  --root-ca-file="$pki/ca.crt" --service-account-private-key-file="$pki/sa.key" \
  --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
  --profiling=false --v=2
log "control plane up after $((SECONDS - t_start))s: $(k version -o json | jq -r '.serverVersion.gitVersion')"

# ---------------------------------------------------------------- install
scenario "manifests: kubectl apply -k deploy/ and the examples are accepted by the API server"
# A server-side dry run on an empty cluster rejects the namespaced objects
# (their namespace does not exist yet), so apply for real, then dry-run the
# same kustomization again, which must be accepted unchanged.
k apply -k "$repo/deploy/" >"$W/logs/apply.log" 2>&1 || { cat "$W/logs/apply.log" >&2; fail "kubectl apply -k deploy/"; }
k apply -k "$repo/deploy/" --dry-run=server >>"$W/logs/apply.log" 2>&1 ||
  { cat "$W/logs/apply.log" >&2; fail "kubectl apply -k deploy/ --dry-run=server"; }
# The optional component that puts the upstream node-driver-registrar and
# livenessprobe sidecars back renders on top of deploy/ and is accepted.
mkdir -p "$W/sidecars"
printf 'resources:\n  - %s\ncomponents:\n  - %s\n' "$(realpath --relative-to="$W/sidecars" "$repo/deploy")" \
  "$(realpath --relative-to="$W/sidecars" "$repo/deploy/components/upstream-sidecars")" >"$W/sidecars/kustomization.yaml"
k apply -k "$W/sidecars" --dry-run=server >>"$W/logs/apply.log" 2>&1 ||
  { cat "$W/logs/apply.log" >&2; fail "kubectl apply -k deploy/ + components/upstream-sidecars --dry-run=server"; }
[[ "$(k kustomize "$W/sidecars" | grep -c 'name: node-driver-registrar$')" == 1 ]] || fail "the upstream-sidecars component adds no node-driver-registrar"
# Snapshots: the CRDs install for real (the examples' VolumeSnapshot needs
# them), the snapshot-controller and the snapshots component (csi-snapshotter
# sidecar, its RBAC, the VolumeSnapshotClass) are accepted on top of them.
k apply -k "$repo/deploy/snapshot-controller/crds" >>"$W/logs/apply.log" 2>&1 ||
  { cat "$W/logs/apply.log" >&2; fail "kubectl apply -k deploy/snapshot-controller/crds"; }
k wait --for condition=established --timeout=60s crd/volumesnapshots.snapshot.storage.k8s.io \
  crd/volumesnapshotcontents.snapshot.storage.k8s.io crd/volumesnapshotclasses.snapshot.storage.k8s.io \
  >>"$W/logs/apply.log" 2>&1 || fail "the snapshot CRDs are not established"
k apply -k "$repo/deploy/snapshot-controller" --dry-run=server >>"$W/logs/apply.log" 2>&1 ||
  { cat "$W/logs/apply.log" >&2; fail "kubectl apply -k deploy/snapshot-controller --dry-run=server"; }
mkdir -p "$W/snapshots"
printf 'resources:\n  - %s\ncomponents:\n  - %s\n' "$(realpath --relative-to="$W/snapshots" "$repo/deploy")" \
  "$(realpath --relative-to="$W/snapshots" "$repo/deploy/components/snapshots")" >"$W/snapshots/kustomization.yaml"
k apply -k "$W/snapshots" --dry-run=server >>"$W/logs/apply.log" 2>&1 ||
  { cat "$W/logs/apply.log" >&2; fail "kubectl apply -k deploy/ + components/snapshots --dry-run=server"; }
[[ "$(k kustomize "$W/snapshots" | grep -c 'name: csi-snapshotter$')" == 1 ]] || fail "the snapshots component adds no csi-snapshotter"
# Without it, the driver container itself registers with the kubelet and
# answers the livenessProbe.
[[ "$(k get ds -n "$NS" hostpath-csi-node -o json | jq -r '[.spec.template.spec.containers[].name] | join(",")')" != *registrar* ]] ||
  fail "deploy/ still runs node-driver-registrar"
k create namespace "$APP_NS" >/dev/null
for f in "$repo"/deploy/examples/*.yaml; do
  k apply -n "$APP_NS" --dry-run=server -f "$f" >>"$W/logs/apply.log" 2>&1 ||
    { cat "$W/logs/apply.log" >&2; fail "kubectl apply --dry-run=server -f $f"; }
done
[[ "$(k get csidriver $DRIVER -o jsonpath='{.spec.attachRequired} {.spec.podInfoOnMount} {.spec.storageCapacity} {.spec.fsGroupPolicy}')" == "false true true File" ]] ||
  fail "CSIDriver fields"
[[ "$(k get sc hdd ssd -o jsonpath='{range .items[*]}{.parameters.pool}/{.volumeBindingMode}/{.allowVolumeExpansion}/{.reclaimPolicy} {end}')" == \
   "hdd/WaitForFirstConsumer/false/Delete ssd/WaitForFirstConsumer/false/Delete " ]] || fail "StorageClasses"
pass

# ---------------------------------------------------------------- node
# What a kubelet would have done: register the Node, with the driver's
# topology label (added by the kubelet when the node plugin registers).
k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata:
  name: $NODE
  labels:
    kubernetes.io/hostname: $NODE
    kubernetes.io/os: linux
    $TOPOLOGY_KEY: $NODE
EOF
# The DaemonSet controller creates the node plugin's Pod for this Node; it
# stays Pending (no kubelet) but is the owner csi-provisioner looks up.
# The controller leaves spec.nodeName to the scheduler and pins the pod to
# its node with a required node affinity on metadata.name.
get_ds_pod() {
  k get pods -n "$NS" -l app.kubernetes.io/name=hostpath-csi-node -o json | jq -er --arg n "$NODE" '
    [.items[] | select(.metadata.ownerReferences[0].kind == "DaemonSet")
     | select([.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution
               .nodeSelectorTerms[].matchFields[]? | .values[]] | index($n))
     | .metadata.name] | first'
}
wait_for 90 "the DaemonSet's pod for $NODE" get_ds_pod
POD_NAME="$(get_ds_pod)"
log "node plugin pod: $NS/$POD_NAME"

# csi-provisioner authenticates as the DaemonSet's ServiceAccount.
SA_TOKEN="$(k create token hostpath-csi-node -n "$NS" --duration=2h)"
kubeconfig "$W/provisioner.kubeconfig" --token="$SA_TOKEN"

# ---------------------------------------------------------------- pools and driver
ROOT="$W/root"   # stands for the node's / in paths taken from deploy/
HDD="$ROOT/var/lib/hostpath-csi/hdd"
SSD="$ROOT/var/lib/hostpath-csi/ssd"
SOCK_DIR="$ROOT/var/lib/kubelet/plugins/$DRIVER"
mkdir -p "$HDD" "$SSD" "$SOCK_DIR"
mount -t tmpfs -o "size=${HDD_SIZE_MI}m,mode=0755" e2e-hdd "$HDD"
mount -t tmpfs -o "size=${SSD_SIZE_MI}m,mode=0755" e2e-ssd "$SSD"

# The driver's config is the ConfigMap's, with pool paths moved under $ROOT.
k get configmap -n "$NS" hostpath-csi-config -o jsonpath='{.data.config\.toml}' |
  sed "s#path = \"/#path = \"$ROOT/#" >"$W/config.toml"
{ grep -q "$HDD" "$W/config.toml" && grep -q "$SSD" "$W/config.toml"; } || fail "rewriting pool paths in the ConfigMap's config"

# container_json NAME: one container of the installed DaemonSet.
container_json() {
  k get ds -n "$NS" hostpath-csi-node -o json | jq -c --arg n "$1" '.spec.template.spec.containers[] | select(.name == $n)'
}
DRIVER_ARGS=()
driver_json=$(container_json hostpath-csi) || fail "reading the driver container from the DaemonSet"
while IFS= read -r a; do DRIVER_ARGS+=("$a"); done < <(jq -r '.args[]' <<<"$driver_json")
# The point is to run the DaemonSet's own flags: none read means none tested.
((${#DRIVER_ARGS[@]})) || fail "no driver args read from the DaemonSet"
DRIVER_ENDPOINT="$(container_json hostpath-csi | jq -r '.env[] | select(.name == "CSI_ENDPOINT") | .value')"
[[ "$DRIVER_ENDPOINT" == "unix:///csi/csi.sock" ]] || fail "unexpected CSI_ENDPOINT $DRIVER_ENDPOINT in the DaemonSet"

start_driver() {
  # Env as in the DaemonSet: CSI_ENDPOINT (socket-dir is mounted at /csi),
  # NODE_NAME from the downward API, HOSTPATH_CSI_CONFIG.
  CSI_ENDPOINT="unix://$SOCK_DIR/csi.sock" NODE_NAME="$NODE" HOSTPATH_CSI_CONFIG="$W/config.toml" \
    start "hostpath-csi-$1" "$HOSTPATH_CSI" "${DRIVER_ARGS[@]}"
  PIDS[driver]=${PIDS["hostpath-csi-$1"]}; unset "PIDS[hostpath-csi-$1]"
  wait_for 30 "the driver socket to accept connections" sock_ready "$SOCK_DIR/csi.sock"
}
log "starting hostpath-csi: ${DRIVER_ARGS[*]}"
start_driver 1

# csi-provisioner with the DaemonSet's flags; --csi-address points at the
# driver socket on the host, plus a kubeconfig (no in-cluster config here) and
# a short capacity poll interval so the test need not wait a minute.
PROV_ARGS=()
prov_json=$(container_json csi-provisioner) || fail "reading the csi-provisioner container from the DaemonSet"
while IFS= read -r a; do
  case "$a" in
    --csi-address=*) PROV_ARGS+=("--csi-address=$SOCK_DIR/csi.sock") ;;
    *) PROV_ARGS+=("$a") ;;
  esac
done < <(jq -r '.args[]' <<<"$prov_json")
((${#PROV_ARGS[@]})) || fail "no csi-provisioner args read from the DaemonSet"
PROV_ARGS+=("--kubeconfig=$W/provisioner.kubeconfig" "--capacity-poll-interval=3s" "--http-endpoint=127.0.0.1:$(free_port)")
log "starting csi-provisioner: ${PROV_ARGS[*]}"
NODE_NAME="$NODE" NAMESPACE="$NS" POD_NAME="$POD_NAME" supervise csi-provisioner "$CSI_PROVISIONER" "${PROV_ARGS[@]}"
log "setup done after $((SECONDS - t_start))s"

# ---------------------------------------------------------------- helpers
claim() { # NAME CLASS SIZE
  k apply -n "$APP_NS" -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: $1
  annotations:
    # Set by the scheduler when a pod using the claim is placed on a node.
    volume.kubernetes.io/selected-node: $NODE
spec:
  storageClassName: $2
  accessModes: ["ReadWriteOnce"]
  resources:
    requests:
      storage: $3
EOF
}
pvc_phase() { k get pvc -n "$APP_NS" "$1" -o jsonpath='{.status.phase}'; }
is_bound() { [[ "$(pvc_phase "$1")" == Bound ]]; }
pv_of() { k get pvc -n "$APP_NS" "$1" -o jsonpath='{.spec.volumeName}'; }
pv_gone() { ! k get pv "$1" >/dev/null 2>&1; }
# capacity CLASS: bytes in this node's CSIStorageCapacity object for CLASS.
capacity() {
  k get csistoragecapacities -n "$NS" -o json | jq -er --arg c "$1" --arg k "$TOPOLOGY_KEY" --arg n "$NODE" '
    [.items[] | select(.storageClassName == $c and .nodeTopology.matchLabels[$k] == $n)]
    | if length == 1 then .[0].capacity else error("want one object, have \(length)") end' |
    python3 -c 'import sys
s = sys.stdin.read().strip()
units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
for u, m in units.items():
    if s.endswith(u):
        print(int(float(s[:-len(u)]) * m)); break
else:
    print(int(s))'
}
has_capacity() { local c; c="$(capacity "$1")" && ((c > 0)); }
capacity_below() { local c; c="$(capacity "$1")" && ((c < $2)); }
capacity_above() { local c; c="$(capacity "$1")" && ((c > $2)); }
# capacity_current CLASS DIR: the object already shows what DIR's filesystem
# has free now (the provisioner polls, so it lags behind recent creates).
capacity_current() {
  local c; c="$(capacity "$1")" && ((c == $(stat -f -c '%a * %S' "$2")))
}
# check_provisioned CLAIM POOL POOLDIR: asserts on the PV and the pool dir.
check_provisioned() {
  local pvc="$1" pool="$2" dir="$3" pv
  pv="$(pv_of "$pvc")"
  [[ "$pv" == pvc-* ]] || fail "claim $pvc: unexpected volume name '$pv'"
  local got
  got="$(k get pv "$pv" -o jsonpath='{.spec.csi.driver} {.spec.csi.volumeHandle} {.spec.storageClassName} {.status.phase} {.spec.persistentVolumeReclaimPolicy}')"
  [[ "$got" == "$DRIVER $pool:$pv $pool Bound Delete" ]] || fail "PV $pv: got '$got'"
  got="$(k get pv "$pv" -o json | jq -c '.spec.nodeAffinity.required.nodeSelectorTerms')"
  [[ "$got" == "[{\"matchExpressions\":[{\"key\":\"$TOPOLOGY_KEY\",\"operator\":\"In\",\"values\":[\"$NODE\"]}]}]" ]] ||
    fail "PV $pv node affinity: $got"
  [[ -d "$dir/$pv" ]] || fail "no volume directory $dir/$pv"
  [[ -f "$dir/.$pv.meta" ]] || fail "no volume record $dir/.$pv.meta"
  # --extra-create-metadata: the claim's name reached the driver's record.
  grep -q "\"$pvc\"" "$dir/.$pv.meta" || fail "volume record $dir/.$pv.meta does not name claim $pvc"
  local other="$HDD"; [[ "$dir" == "$HDD" ]] && other="$SSD"
  [[ ! -e "$other/$pv" ]] || fail "volume $pv also exists in the other pool $other"
  log "  $pvc -> $pv ($pool:$pv) at $dir/$pv"
}

# ---------------------------------------------------------------- scenarios
scenario "1 provisioning: claims on ssd and hdd become Bound PVs on this node, in the right pool dirs"
claim data-ssd ssd 10Mi
claim data-hdd hdd 10Mi
wait_for 120 "claim data-ssd Bound" is_bound data-ssd
wait_for 60 "claim data-hdd Bound" is_bound data-hdd
check_provisioned data-ssd ssd "$SSD"
check_provisioned data-hdd hdd "$HDD"
pass

scenario "2 capacity: CSIStorageCapacity objects for both classes, following the pools' free space"
wait_for 60 "CSIStorageCapacity for hdd" has_capacity hdd
wait_for 60 "CSIStorageCapacity for ssd" has_capacity ssd
# The baseline must include scenario 1's volumes, or a later poll that
# catches up with them reads as a change.
wait_for 60 "hdd capacity to show the pool's free space" capacity_current hdd "$HDD"
wait_for 60 "ssd capacity to show the pool's free space" capacity_current ssd "$SSD"
hdd_cap="$(capacity hdd)"; ssd_cap="$(capacity ssd)"
log "  capacity: hdd=$hdd_cap ssd=$ssd_cap"
((hdd_cap > ssd_cap)) || fail "hdd ($hdd_cap) should have more capacity than ssd ($ssd_cap)"
((hdd_cap <= HDD_SIZE_MI * 1048576 && ssd_cap <= SSD_SIZE_MI * 1048576)) || fail "capacity larger than the pool filesystems"
owner="$(k get csistoragecapacities -n "$NS" -o json | jq -r '[.items[].metadata.ownerReferences[0] | "\(.kind)/\(.name)"] | unique | join(",")')"
[[ "$owner" == "DaemonSet/hostpath-csi-node" ]] || fail "CSIStorageCapacity owner: $owner"
ssd_pv="$(pv_of data-ssd)"
dd if=/dev/urandom of="$SSD/$ssd_pv/blob" bs=1M count=16 status=none
sha_blob="$(sha256sum <"$SSD/$ssd_pv/blob")"
wait_for 60 "ssd capacity to drop by the 16 MiB written" capacity_below ssd $((ssd_cap - 15 * 1048576))
log "  ssd capacity after writing 16 MiB: $(capacity ssd)"
[[ "$(capacity hdd)" == "$hdd_cap" ]] || fail "hdd capacity changed when only ssd was written"
pass

scenario "3a delete: deleting a claim deletes its PV and volume directory"
hdd_pv="$(pv_of data-hdd)"
echo "some data" >"$HDD/$hdd_pv/file"
k delete pvc -n "$APP_NS" data-hdd --wait=true >/dev/null
wait_for 60 "PV $hdd_pv deleted" pv_gone "$hdd_pv"
[[ ! -e "$HDD/$hdd_pv" ]] || fail "volume directory $HDD/$hdd_pv still exists"
[[ ! -e "$HDD/.$hdd_pv.meta" ]] || fail "volume record $HDD/.$hdd_pv.meta still exists"
pass

scenario "3b delete after a driver crash: kill -9 and restart between create and delete"
[[ "$(sha256sum <"$SSD/$ssd_pv/blob")" == "$sha_blob" ]] || fail "data changed"
stop_hard driver
log "  driver killed with SIGKILL; starting it again"
start_driver 2
k delete pvc -n "$APP_NS" data-ssd --wait=true >/dev/null
wait_for 90 "PV $ssd_pv deleted" pv_gone "$ssd_pv"
log "  csi-provisioner restarts so far: $(restarts csi-provisioner) (it exits when the driver goes away)"
[[ ! -e "$SSD/$ssd_pv" ]] || fail "volume directory $SSD/$ssd_pv (with 16 MiB of data) still exists"
[[ ! -e "$SSD/.$ssd_pv.meta" ]] || fail "volume record $SSD/.$ssd_pv.meta still exists"
wait_for 60 "ssd capacity to rise again" capacity_above ssd $((ssd_cap - 2 * 1048576))
log "  ssd capacity after the delete: $(capacity ssd)"
pass

scenario "4 static volume: PV + claim via volumeName bind; after the claim is deleted the PV is Released and the data untouched"
mkdir "$HDD/static-data"
echo "precious admin data" >"$HDD/static-data/keep.txt"
dd if=/dev/urandom of="$HDD/static-data/blob" bs=1M count=2 status=none
sha_static="$(cd "$HDD/static-data" && sha256sum keep.txt blob)"
sed "s/NODE_NAME/$NODE/" "$repo/deploy/examples/static-volume.yaml" | k apply -n "$APP_NS" -f - >/dev/null
wait_for 60 "static claim Bound" is_bound static-data
got="$(k get pv static-data -o jsonpath='{.status.phase} {.spec.claimRef.name} {.spec.csi.volumeHandle}')"
[[ "$got" == "Bound static-data hdd:static-data" ]] || fail "static PV: $got"
k delete pvc -n "$APP_NS" static-data --wait=true >/dev/null
pv_released() { [[ "$(k get pv static-data -o jsonpath='{.status.phase}')" == Released ]]; }
wait_for 60 "static PV Released" pv_released
sleep 5   # give a wrong DeleteVolume the time to happen
[[ "$(k get pv static-data -o jsonpath='{.status.phase}')" == Released ]] || fail "static PV left Released"
[[ "$(cd "$HDD/static-data" && sha256sum keep.txt blob)" == "$sha_static" ]] || fail "static volume data changed or gone"
k delete pv static-data --wait=true >/dev/null
sleep 2
[[ "$(cd "$HDD/static-data" && sha256sum keep.txt blob)" == "$sha_static" ]] || fail "static data gone after deleting the PV"
pass

kill -0 "${PIDS[driver]}" 2>/dev/null || fail "the driver exited"
# The supervisor restarts csi-provisioner, so check its child: it must be
# running, and have restarted only around the deliberate driver kill (once,
# or twice if its first restart came before the driver was back): more
# means a crash loop.
pgrep -P "${PIDS[csi-provisioner]}" >/dev/null || fail "csi-provisioner is not running"
(($(restarts csi-provisioner) <= 2)) || fail "csi-provisioner restarted $(restarts csi-provisioner) times"
# The RBAC rules in deploy/ must cover everything csi-provisioner did.
current="RBAC: csi-provisioner, running with the DaemonSet's ServiceAccount, was never refused"
if grep -i "forbidden" "$W/logs/csi-provisioner.log" >&2; then fail "csi-provisioner was refused access (above)"; fi
pass
scenario "6 snapshots: a VolumeSnapshot of a claim with known data, a claim restored from it and a clone hold that data on disk"
# The snapshots component's RBAC and class for real (its sidecar runs here as
# a host process with the DaemonSet's ServiceAccount token, like
# csi-provisioner); the snapshot controller in distributed mode, with the
# admin's credentials (its own ServiceAccount and RBAC are in
# deploy/snapshot-controller, checked above).
k apply -f "$repo/deploy/components/snapshots/rbac.yaml" -f "$repo/deploy/components/snapshots/volumesnapshotclass.yaml" >>"$W/logs/apply.log" 2>&1 ||
  fail "applying the snapshots component's RBAC and VolumeSnapshotClass"
start snapshot-controller "$SNAPSHOT_CONTROLLER" --kubeconfig="$W/admin.kubeconfig" --leader-election=false \
  --enable-distributed-snapshotting=true --v=2
NODE_NAME="$NODE" supervise csi-snapshotter "$CSI_SNAPSHOTTER" --csi-address="$SOCK_DIR/csi.sock" \
  --node-deployment=true --leader-election=false --kubeconfig="$W/provisioner.kubeconfig" --v=2
claim snap-src hdd 8Mi
wait_for 60 "claim snap-src Bound" is_bound snap-src
src_pv="$(pv_of snap-src)"
[[ -n "$src_pv" && -d "$HDD/$src_pv" ]] || fail "no volume directory for claim snap-src"
head -c 1048576 /dev/urandom >"$HDD/$src_pv/data" || fail "writing into $HDD/$src_pv"
mkdir -p "$HDD/$src_pv/sub" && echo "kept" >"$HDD/$src_pv/sub/file"
before_sum="$(cat "$HDD/$src_pv/data" "$HDD/$src_pv/sub/file" | sha256sum)"
k apply -n "$APP_NS" -f - >/dev/null <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata:
  name: snap1
spec:
  volumeSnapshotClassName: hostpath-csi
  source:
    persistentVolumeClaimName: snap-src
EOF
snap_ready() { [[ "$(k get volumesnapshot -n "$APP_NS" snap1 -o jsonpath='{.status.readyToUse}')" == true ]]; }
wait_for 90 "VolumeSnapshot snap1 readyToUse" snap_ready
snap_content="$(k get volumesnapshot -n "$APP_NS" snap1 -o jsonpath='{.status.boundVolumeSnapshotContentName}')"
snap_handle="$(k get volumesnapshotcontent "$snap_content" -o jsonpath='{.status.snapshotHandle}')"
snap_token="$(cut -d@ -f2 <<<"$snap_handle")"
[[ -n "$snap_token" && -d "$HDD/.snapshots/$snap_token" && -f "$HDD/.snapshots/.$snap_token.meta" ]] ||
  fail "snapshot $snap_handle is not in $HDD/.snapshots"
log "  snapshot $snap_handle at $HDD/.snapshots/$snap_token"
# The source changes after the snapshot.
echo "changed" >"$HDD/$src_pv/data"
after_sum="$(cat "$HDD/$src_pv/data" "$HDD/$src_pv/sub/file" | sha256sum)"
from_source() { # NAME KIND SOURCE APIGROUP
  k apply -n "$APP_NS" -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: $1
  annotations:
    volume.kubernetes.io/selected-node: $NODE
spec:
  storageClassName: hdd
  accessModes: ["ReadWriteOnce"]
  resources:
    requests:
      storage: 8Mi
  dataSource:
    apiGroup: "$4"
    kind: $2
    name: $3
EOF
}
from_source restored VolumeSnapshot snap1 snapshot.storage.k8s.io
from_source cloned PersistentVolumeClaim snap-src ""
wait_for 90 "claim restored Bound" is_bound restored
wait_for 90 "claim cloned Bound" is_bound cloned
restored_pv="$(pv_of restored)"; cloned_pv="$(pv_of cloned)"
[[ "$(cat "$HDD/$restored_pv/data" "$HDD/$restored_pv/sub/file" | sha256sum)" == "$before_sum" ]] ||
  fail "the restored volume $restored_pv does not hold the data at the snapshot"
[[ "$(cat "$HDD/$cloned_pv/data" "$HDD/$cloned_pv/sub/file" | sha256sum)" == "$after_sum" ]] ||
  fail "the clone $cloned_pv does not hold its source's data"
grep -q "snapshot $snap_handle" "$HDD/.$restored_pv.meta" || fail "the restored volume's record does not name its snapshot"
# Deleting the source claim deletes its volume; the snapshot stays, and goes
# with its VolumeSnapshot (deletionPolicy Delete).
k delete pvc -n "$APP_NS" snap-src --wait=true --timeout=60s >/dev/null || fail "deleting claim snap-src"
wait_for 60 "PV $src_pv deleted" pv_gone "$src_pv"
[[ ! -e "$HDD/$src_pv" && -d "$HDD/.snapshots/$snap_token" ]] || fail "after deleting the source: volume or snapshot not as expected"
k delete volumesnapshot -n "$APP_NS" snap1 --wait=true --timeout=60s >/dev/null || fail "deleting VolumeSnapshot snap1"
snapshot_gone() { [[ ! -e "$HDD/.snapshots/$snap_token" && ! -e "$HDD/.snapshots/.$snap_token.meta" ]]; }
wait_for 60 "the snapshot's data removed from $HDD/.snapshots" snapshot_gone
k delete pvc -n "$APP_NS" restored cloned --wait=true --timeout=60s >/dev/null || fail "deleting the restored and cloned claims"
wait_for 60 "PV $restored_pv deleted" pv_gone "$restored_pv"
wait_for 60 "PV $cloned_pv deleted" pv_gone "$cloned_pv"
if grep -i "forbidden" "$W/logs/csi-snapshotter.log" >&2; then fail "csi-snapshotter was refused access (above)"; fi
for p in csi-snapshotter snapshot-controller; do
  kill "${PIDS[$p]}" 2>/dev/null; wait "${PIDS[$p]}" 2>/dev/null || true; unset "PIDS[$p]"
done
pass

scenario "5 uninstall: kubectl delete -k deploy/ removes the install, capacity objects included"
# The node plugin goes first (in a cluster, deleting the DaemonSet does that).
kill "${PIDS[csi-provisioner]}"; wait "${PIDS[csi-provisioner]}" 2>/dev/null || true; unset "PIDS[csi-provisioner]"
kill "${PIDS[driver]}"; wait "${PIDS[driver]}" 2>/dev/null || true; unset "PIDS[driver]"
k delete -k "$repo/deploy/" --wait=true --timeout=120s >>"$W/logs/apply.log" 2>&1 ||
  { tail -n 20 "$W/logs/apply.log" >&2; fail "kubectl delete -k deploy/"; }
ns_gone() { ! k get namespace "$NS" >/dev/null 2>&1; }
wait_for 120 "namespace $NS deleted" ns_gone
left=$(k get csistoragecapacities -A -o name) || fail "kubectl get csistoragecapacities failed"
[[ -z $left ]] || fail "CSIStorageCapacity objects left behind: $left"
# One `get` per kind: kubectl refuses a mix of kinds and kind/name forms,
# and a refused query must fail the check, not pass it as "nothing left".
for obj in "csidriver hostpath-csi.dev" "storageclass hdd ssd" \
  "clusterrole hostpath-csi-provisioner" "clusterrolebinding hostpath-csi-provisioner"; do
  # shellcheck disable=SC2086 # kind and names are separate words
  left=$(k get $obj -o name --ignore-not-found) || fail "kubectl get $obj failed"
  [[ -z $left ]] || fail "cluster-scoped objects left behind: $left"
done
pass

log "all scenarios done after $((SECONDS - t_start))s"
echo "$passed passed, $failed failed"
