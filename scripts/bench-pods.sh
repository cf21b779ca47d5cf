#!/usr/bin/env bash
# Benchmark (not a test): seconds from `kubectl apply` of claim(s) plus
# pod(s) to every pod Running, on the local cluster of scripts/cluster-up.sh,
# for three kinds of pod storage side by side in the same cluster:
#   emptydir     the same pods with an emptyDir (no claim): the floor
#   hostpath     a claim on hostpath-csi's `hdd` StorageClass (deploy/ as is)
#   local-path   a claim on rancher's local-path-provisioner v0.0.30,
#                installed from its own deploy/local-path-storage.yaml
# for one pod, and for a burst of BURST claims with their pods applied at
# once. Each measurement is repeated RUNS times, interleaved across the
# kinds; the median is reported, with the time to delete them all again
# (until their PVs are gone). The results go to stdout as a Markdown table.
#
# Usage (as root): scripts/bench-pods.sh
# Environment: RUNS (default 5), BURST (default 50), CLUSTER_DIR (default a
#   temp dir; the cluster is brought up and torn down here).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
RUNS="${RUNS:-5}"
BURST="${BURST:-50}"
export CLUSTER_DIR="${CLUSTER_DIR:-$(mktemp -d /var/tmp/hostpath-csi-bench.XXXXXX)}"
rmdir "$CLUSTER_DIR" 2>/dev/null || true
[[ $(id -u) -eq 0 ]] || { echo "run as root" >&2; exit 1; }
log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }

LP_DIR=/opt/local-path-provisioner   # where local-path-provisioner puts volumes
made_lp_dir=""
[[ -e $LP_DIR ]] || made_lp_dir=1
cleanup() {
  local rc=$?
  set +e
  "$here/cluster-down.sh" >&2
  [[ -n $made_lp_dir ]] && rm -rf --one-file-system "$LP_DIR"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

IMAGES=local-path NODES=1 "$here/cluster-up.sh" >&2
# shellcheck disable=SC1091
source "$CLUSTER_DIR/env"
k() { "$KUBECTL" "$@"; }

# local-path-provisioner as its users install it: its own manifest from the
# module we built, with the image names spelled out in full.
lp_manifest="$(cd "$repo/tests/e2e/tools/localpath" && go list -m -f '{{.Dir}}' github.com/rancher/local-path-provisioner)/deploy/local-path-storage.yaml"
[[ -f $lp_manifest ]] || { log "no $lp_manifest"; exit 1; }
k apply -f "$lp_manifest" >&2
lp_ready() { [[ "$(k get deploy -n local-path-storage local-path-provisioner -o jsonpath='{.status.readyReplicas}')" == 1 ]]; }
for _ in $(seq 240); do lp_ready && break; sleep 0.5; done
lp_ready || { k get pods -A >&2; log "local-path-provisioner did not start"; exit 1; }
k create namespace bench >/dev/null

now() { date +%s.%N; }

# manifests KIND I: claim (unless emptydir) and pod number I.
manifests() {
  local kind="$1" i="$2" class=""
  case "$kind" in hostpath) class=hdd ;; local-path) class=local-path ;; esac
  if [[ -n $class ]]; then
    cat <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: c-$i, labels: {bench: "1"}}
spec:
  storageClassName: $class
  accessModes: ["ReadWriteOnce"]
  resources: {requests: {storage: 16Mi}}
---
EOF
  fi
  cat <<EOF
apiVersion: v1
kind: Pod
metadata: {name: p-$i, labels: {bench: "1"}}
spec:
  terminationGracePeriodSeconds: 0
  containers:
    - name: c
      image: docker.io/library/busybox:1.37
      imagePullPolicy: Never
      command: ["sleep", "3600"]
      volumeMounts: [{name: v, mountPath: /data}]
  volumes:
EOF
  if [[ -n $class ]]; then
    echo "    - {name: v, persistentVolumeClaim: {claimName: c-$i}}"
  else
    echo "    - {name: v, emptyDir: {}}"
  fi
  echo "---"
}

all_running() { # N
  local n
  n="$(k get pods -n bench -l bench=1 -o json | jq '[.items[] | select(.status.phase == "Running")] | length')"
  ((n == $1))
}
all_gone() {
  [[ -z "$(k get pods,pvc -n bench -l bench=1 -o name)" ]] &&
    [[ -z "$(k get pv -o json | jq -r '.items[] | select(.spec.claimRef.namespace == "bench") | .metadata.name')" ]]
}

# measure KIND N: prints "up down" seconds.
measure() {
  local kind="$1" n="$2" i f
  f="$(mktemp)"
  for i in $(seq "$n"); do manifests "$kind" "$i"; done >"$f"
  local t0 t1 t2
  t0="$(now)"
  k apply -n bench -f "$f" >/dev/null
  until all_running "$n"; do
    sleep 0.1
    if (($(printf '%.0f' "$(echo "$(now) - $t0" | bc)") > 600)); then
      log "$kind x$n: not all Running after 600 s"; k get pods,pvc -n bench >&2; exit 1
    fi
  done
  t1="$(now)"
  k delete -n bench -f "$f" --wait=false >/dev/null
  until all_gone; do sleep 0.2; done
  t2="$(now)"
  rm -f "$f"
  printf '%.2f %.2f\n' "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t1" | bc)"
}

median() { sort -n | awk '{a[NR] = $1} END {if (NR % 2) print a[(NR + 1) / 2]; else printf "%.2f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

kinds=(emptydir hostpath local-path)
declare -A up down
for size in 1 "$BURST"; do
  for run in $(seq "$RUNS"); do
    for kind in "${kinds[@]}"; do
      read -r u d < <(measure "$kind" "$size")
      log "$kind x$size run $run: Running after $u s, deleted after $d s"
      up[$kind/$size]+="$u "
      down[$kind/$size]+="$d "
    done
  done
done

med() { tr ' ' '\n' <<<"$1" | grep . | median; }
echo "| | emptyDir | hostpath-csi (deploy/) | local-path-provisioner v0.0.30 | hostpath-csi / emptyDir | local-path / hostpath-csi |"
echo "|---|---|---|---|---|---|"
for size in 1 "$BURST"; do
  for what in up down; do
    e=""; h=""; l=""
    if [[ $what == up ]]; then
      e="$(med "${up[emptydir/$size]}")"; h="$(med "${up[hostpath/$size]}")"; l="$(med "${up[local-path/$size]}")"
      label="apply to all Running, $size pod(s)"
    else
      e="$(med "${down[emptydir/$size]}")"; h="$(med "${down[hostpath/$size]}")"; l="$(med "${down[local-path/$size]}")"
      label="delete until gone, $size pod(s)"
    fi
    printf '| %s, median of %s | %s s | %s s | %s s | %.2f | %.2f |\n' "$label" "$RUNS" "$e" "$h" "$l" \
      "$(echo "$h / $e" | bc -l)" "$(echo "$l / $h" | bc -l)"
  done
done
