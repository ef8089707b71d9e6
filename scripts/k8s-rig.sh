#!/usr/bin/env bash
# The Kubernetes test rig: a real control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler) with kwok's fake kubelets, all on 127.0.0.1. See docs/kubernetes-rig.md.
#
#   scripts/k8s-rig.sh build   build (or find cached) binaries outside the repository
#   scripts/k8s-rig.sh start   build if needed, start everything, create the fake nodes
#   scripts/k8s-rig.sh check   smoke check: a Deployment scheduled, Ready, scaled, deleted
#   scripts/k8s-rig.sh status  what runs, what answers
#   scripts/k8s-rig.sh env     the KUBECONFIG and apiserver URL, as shell exports
#   scripts/k8s-rig.sh stop    stop every process of the rig (its data is kept)
#   scripts/k8s-rig.sh reset   stop, then remove the run dir (certificates, etcd data, logs)
#
# Every subcommand is idempotent and safe to run twice (or at the same time: they take a lock).
# Must run as root (apt-get for etcd and tools; the default dirs are under /var/lib).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")
MODULE_DIR=$REPO_DIR/rig/kubernetes
ETCD_MODULE_DIR=$MODULE_DIR/etcd

# The Kubernetes and etcd versions are the ones rig/kubernetes/go.mod and
# rig/kubernetes/etcd/go.mod require; kwok's is pinned here.
K8S_VERSION=$(sed -n 's|^[[:space:]]*k8s.io/kubernetes v\([0-9.]*\)$|\1|p' "$MODULE_DIR/go.mod" | head -n1)
ETCD_VERSION=$(sed -n 's|^[[:space:]]*\(require \)\{0,1\}go.etcd.io/etcd/server/v3 v\([0-9.]*\)$|\2|p' "$ETCD_MODULE_DIR/go.mod" | head -n1)
KWOK_VERSION=0.8.0

RIG_DIR=${MICROSCALER_K8S_DIR:-/var/lib/microscaler-ci/k8s}
CACHE_DIR=$RIG_DIR/v$K8S_VERSION-kwok$KWOK_VERSION
BIN=$CACHE_DIR/bin
RUN=${MICROSCALER_K8S_RUN:-$RIG_DIR/run}
PKI=$RUN/pki
LOGS=$RUN/logs
PIDS=$RUN/pids
KUBECONFIG_FILE=$RUN/admin.kubeconfig
# etcd: built from rig/kubernetes/etcd by default. MICROSCALER_ETCD_BIN=/usr/bin/etcd runs
# Debian's etcd-server (3.4.23) instead: it works, but degraded (see docs/kubernetes-rig.md).
ETCD_BIN=${MICROSCALER_ETCD_BIN:-$BIN/etcd}

# Fixed loopback ports, away from the usual ones (2379/2380, 6443, 10247/10257/10259).
ETCD_PORT=12379
ETCD_PEER_PORT=12380
APISERVER_PORT=16443
CM_PORT=16257
SCHEDULER_PORT=16259
KWOK_PORT=16247
APISERVER=https://127.0.0.1:$APISERVER_PORT

# Virtual address ranges: nothing routes them, nothing here ever dials them (no kube-proxy, no
# container runtime). The fake kubelet's node address is loopback, where kwok's server answers.
SERVICE_CIDR=10.96.0.0/16
POD_CIDR=10.244.0.0/16

NODES=(kwok-node-0 kwok-node-1 kwok-node-2)
NODE_CPU=4
NODE_MEMORY=8Gi
NODE_PODS=3

COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

say() { echo "k8s-rig: $*"; }
fail() {
  echo "k8s-rig: FAILED: $*" >&2
  exit 1
}
now() { date +%s; }
since() { echo "$(($(now) - $1)) s"; }

# One subcommand at a time: two runs at once (two shells, two CI steps) wait for each other.
take_lock() {
  mkdir -p "$RIG_DIR"
  exec 9>"$RIG_DIR/.lock"
  if ! flock -n 9; then
    say "another k8s-rig.sh holds $RIG_DIR/.lock; waiting for it"
    flock -w 3600 9 || fail "could not take $RIG_DIR/.lock within an hour"
  fi
}

log_of() { echo "$LOGS/$1.log"; }

show_log() {
  local log
  log=$(log_of "$1")
  if [ -s "$log" ]; then
    echo "---- the end of $log ----" >&2
    tail -n "${2:-25}" "$log" >&2
    echo "---- (full log: $log) ----" >&2
  else
    echo "(its log $log is empty or missing)" >&2
  fi
}

# ---------------------------------------------------------------------------------------------
# build

ensure_tools() {
  local need=()
  command -v curl >/dev/null 2>&1 || need+=(curl)
  command -v jq >/dev/null 2>&1 || need+=(jq)
  command -v openssl >/dev/null 2>&1 || need+=(openssl)
  command -v flock >/dev/null 2>&1 || need+=(util-linux)
  command -v ss >/dev/null 2>&1 || need+=(iproute2)
  if [ "$ETCD_BIN" = /usr/bin/etcd ] && [ ! -x /usr/bin/etcd ]; then need+=(etcd-server); fi
  if [ ${#need[@]} -gt 0 ]; then
    say "apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # Debian's etcd-server enables a systemd unit on 2379. The rig runs its own etcd on
    # $ETCD_PORT, so the unit is never needed: where systemd runs, switch it off.
    if [[ " ${need[*]} " == *" etcd-server "* ]] && [ -d /run/systemd/system ]; then
      systemctl disable --now etcd >/dev/null 2>&1 || true
    fi
  fi
}

# What the binaries are built from: a change to any of it rebuilds.
# $1: the module's directory.
source_stamp() {
  {
    echo "k8s $K8S_VERSION etcd $ETCD_VERSION kwok $KWOK_VERSION $(go version 2>/dev/null || echo no-go)"
    cat "$1/go.mod" "$1/go.sum" "$1"/*.go
  } | sha256sum | cut -c1-16
}

# Runs a go build in the background and prints progress each minute until it ends.
run_go_build() {
  local what=$1 log=$2
  shift 2
  local started pid n
  started=$(now)
  say "building $what (log: $log)"
  ("$@") >"$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    for _ in $(seq 1 30); do
      sleep 2
      kill -0 "$pid" 2>/dev/null || break
    done
    if kill -0 "$pid" 2>/dev/null; then
      n=$(grep -cv '^go: ' "$log" 2>/dev/null || true)
      say "  ... $what: $(since "$started"), $n packages compiled so far"
    fi
  done
  if ! wait "$pid"; then
    echo "k8s-rig: FAILED: building $what after $(since "$started"); the end of its log:" >&2
    tail -n 30 "$log" >&2
    echo "(full log: $log)" >&2
    exit 1
  fi
  say "built $what in $(since "$started")"
}

cmd_build() {
  ensure_tools
  [ -n "$K8S_VERSION" ] || fail "no k8s.io/kubernetes version found in $MODULE_DIR/go.mod"
  command -v go >/dev/null 2>&1 || fail "go is not installed (the rig is built with Go >= 1.26)"
  mkdir -p "$BIN"
  local started stamp
  started=$(now)
  # Go's build and module caches of these builds are the rig's own (the user's are not
  # touched). Under CI=true they are removed once the binaries are built: about 6 GB after a
  # cold build, and the binaries, cached by version, are all the tests need. Elsewhere they are
  # kept, so a change to rig/kubernetes rebuilds in a minute.
  export GOCACHE=$RIG_DIR/go-build-cache GOMODCACHE=$RIG_DIR/go-mod-cache
  stamp=$(source_stamp "$MODULE_DIR")

  # kube-apiserver, kube-controller-manager, kube-scheduler, kubectl: one binary of ours.
  if [ -x "$BIN/k8s-rig" ] && [ "$(cat "$CACHE_DIR/k8s-rig.stamp" 2>/dev/null)" = "$stamp" ]; then
    say "kube-apiserver, kube-controller-manager, kube-scheduler, kubectl v$K8S_VERSION: cached ($BIN/k8s-rig)"
  else
    local release_date ldflags p
    # /version reports the release, as upstream's release build does.
    release_date=$(cd "$MODULE_DIR" && go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" |
      jq -r '.Info' | xargs cat | jq -r '.Time') ||
      fail "go mod download k8s.io/kubernetes@v$K8S_VERSION failed (the Go module proxy?)"
    ldflags="-s -w"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldflags+=" -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=${K8S_VERSION%%.*}"
      ldflags+=" -X $p.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) -X $p.gitTreeState=clean"
      ldflags+=" -X $p.buildDate=$release_date -X $p.gitCommit="
    done
    say "kube-apiserver, kube-controller-manager, kube-scheduler, kubectl v$K8S_VERSION: one binary, $BIN/k8s-rig (cold: about 6 to 15 min on 2 cores, more while other builds run)"
    # shellcheck disable=SC2016 # $1.. are bash -c's own arguments
    run_go_build "k8s-rig v$K8S_VERSION" \
      "$CACHE_DIR/build-k8s.log" \
      bash -c 'cd "$1" && go build -v -trimpath -ldflags "$2" -o "$3.tmp" . && mv -f "$3.tmp" "$3"' \
      _ "$MODULE_DIR" "$ldflags" "$BIN/k8s-rig"
    echo "$stamp" >"$CACHE_DIR/k8s-rig.stamp"
  fi
  for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    ln -sfn k8s-rig "$BIN/$c"
  done

  # etcd: upstream's etcdmain behind a main of ours (rig/kubernetes/etcd).
  stamp=$(source_stamp "$ETCD_MODULE_DIR")
  if [ -x "$BIN/etcd" ] && [ "$(cat "$CACHE_DIR/etcd.stamp" 2>/dev/null)" = "$stamp" ]; then
    say "etcd v$ETCD_VERSION: cached ($BIN/etcd)"
  else
    # shellcheck disable=SC2016 # $1.. are bash -c's own arguments
    run_go_build "etcd v$ETCD_VERSION" "$CACHE_DIR/build-etcd.log" \
      bash -c 'cd "$1" && go build -v -trimpath -ldflags "-s -w" -o "$2.tmp" . && mv -f "$2.tmp" "$2"' \
      _ "$ETCD_MODULE_DIR" "$BIN/etcd"
    echo "$stamp" >"$CACHE_DIR/etcd.stamp"
  fi

  # kwok: upstream's command, installed from the Go module proxy at its release.
  if [ -x "$BIN/kwok" ] && [ "$(cat "$CACHE_DIR/kwok.stamp" 2>/dev/null)" = "v$KWOK_VERSION" ]; then
    say "kwok v$KWOK_VERSION: cached ($BIN/kwok)"
  else
    local gobin=$CACHE_DIR/kwok-gobin.tmp
    rm -rf "$gobin"
    run_go_build "kwok v$KWOK_VERSION" "$CACHE_DIR/build-kwok.log" \
      env GOBIN="$gobin" go install -v -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION"
    mv -f "$gobin/kwok" "$BIN/kwok"
    rm -rf "$gobin"
    echo "v$KWOK_VERSION" >"$CACHE_DIR/kwok.stamp"
  fi

  # The bare kwok command has no built-in stages ("no stages found"): kwokctl hands it the
  # stage files of its release. Take the same ones from that release's module at run time.
  if [ ! -s "$CACHE_DIR/kwok-stages.yaml" ]; then
    local kwok_dir
    kwok_dir=$(go mod download -json "sigs.k8s.io/kwok@v$KWOK_VERSION" | jq -r '.Dir') ||
      fail "go mod download sigs.k8s.io/kwok@v$KWOK_VERSION failed (the Go module proxy?)"
    [ -d "$kwok_dir/kustomize/stage" ] || fail "kwok stages: no kustomize/stage in $kwok_dir"
    {
      local f first=1
      for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
        pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
        [ -f "$kwok_dir/kustomize/stage/$f" ] || fail "kwok stages: $kwok_dir/kustomize/stage/$f is missing"
        [ $first = 1 ] || echo "---"
        first=0
        cat "$kwok_dir/kustomize/stage/$f"
      done
    } >"$CACHE_DIR/kwok-stages.yaml.tmp"
    mv -f "$CACHE_DIR/kwok-stages.yaml.tmp" "$CACHE_DIR/kwok-stages.yaml"
    say "kwok stages: $CACHE_DIR/kwok-stages.yaml (from sigs.k8s.io/kwok@v$KWOK_VERSION)"
  fi

  [ -x "$ETCD_BIN" ] || fail "etcd: no executable at $ETCD_BIN"
  say "etcd to run: $ETCD_BIN ($("$ETCD_BIN" --version 2>/dev/null | head -n1))"
  say "binaries ready in $BIN ($(since "$started"))"
  if [ "${CI:-}" = true ] && { [ -d "$GOCACHE" ] || [ -d "$GOMODCACHE" ]; }; then
    local size
    size=$(du -sh "$GOCACHE" "$GOMODCACHE" 2>/dev/null | awk '{print $1}' | paste -sd+ -) || size="?"
    go clean -cache -modcache >/dev/null 2>&1 || true
    rm -rf "$GOCACHE" "$GOMODCACHE" 2>/dev/null || true
    say "removed the Go caches of the build ($size)"
  fi
}

binaries_present() {
  [ -x "$BIN/k8s-rig" ] && [ -x "$BIN/kwok" ] && [ -s "$CACHE_DIR/kwok-stages.yaml" ] &&
    [ -x "$BIN/etcd" ] && [ -x "$ETCD_BIN" ] &&
    [ "$(cat "$CACHE_DIR/k8s-rig.stamp" 2>/dev/null)" = "$(source_stamp "$MODULE_DIR")" ] &&
    [ "$(cat "$CACHE_DIR/etcd.stamp" 2>/dev/null)" = "$(source_stamp "$ETCD_MODULE_DIR")" ]
}

# ---------------------------------------------------------------------------------------------
# certificates and kubeconfigs

# A key and a certificate signed by the rig's CA. $3: the extensions' lines.
make_cert() {
  local name=$1 subject=$2 ext=$3
  [ -s "$PKI/$name.crt" ] && [ -s "$PKI/$name.key" ] && return
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$PKI/$name.key" 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subject" -out "$PKI/$name.csr" 2>/dev/null
  printf '%b\n' "$ext" >"$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

make_pki() {
  mkdir -p "$PKI"
  chmod 700 "$PKI"
  if [ ! -s "$PKI/ca.crt" ] || [ ! -s "$PKI/ca.key" ]; then
    say "certificates: a new CA and certificates in $PKI"
    rm -f "$PKI"/*.crt "$PKI"/*.key
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$PKI/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=microscaler-k8s-rig-ca" -days 3650 -sha256 \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
      -out "$PKI/ca.crt" 2>/dev/null
  fi
  local client="basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth"
  # The apiserver's serving certificate (also kwok's). 10.96.0.1: the kubernetes Service.
  make_cert apiserver "/CN=kube-apiserver" \
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  # The admin: group system:masters (cluster-admin, past RBAC).
  make_cert admin "/O=system:masters/CN=microscaler-admin" "$client"
  # The controller-manager and the scheduler as their own users: their bootstrap RBAC roles.
  make_cert controller-manager "/CN=system:kube-controller-manager" "$client"
  make_cert scheduler "/CN=system:kube-scheduler" "$client"
  # The aggregation layer's front-proxy client (requestheader authentication), as kubeadm sets up.
  make_cert front-proxy-client "/CN=front-proxy-client" "$client"
  # The service-account token signing key pair.
  if [ ! -s "$PKI/sa.key" ] || [ ! -s "$PKI/sa.pub" ]; then
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$PKI/sa.key" 2>/dev/null
    openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  fi
  chmod 600 "$PKI"/*.key
}

b64() { base64 -w0 <"$1"; }

write_kubeconfig() {
  local file=$1 user=$2 cert=$3 key=$4
  cat >"$file.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: k8s-rig
  cluster:
    server: $APISERVER
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(b64 "$cert")
    client-key-data: $(b64 "$key")
contexts:
- name: k8s-rig
  context:
    cluster: k8s-rig
    user: $user
current-context: k8s-rig
EOF
  chmod 600 "$file.tmp"
  mv -f "$file.tmp" "$file"
}

make_kubeconfigs() {
  write_kubeconfig "$KUBECONFIG_FILE" microscaler-admin "$PKI/admin.crt" "$PKI/admin.key"
  write_kubeconfig "$RUN/controller-manager.kubeconfig" system:kube-controller-manager \
    "$PKI/controller-manager.crt" "$PKI/controller-manager.key"
  write_kubeconfig "$RUN/scheduler.kubeconfig" system:kube-scheduler "$PKI/scheduler.crt" "$PKI/scheduler.key"
}

# ---------------------------------------------------------------------------------------------
# processes

port_of() {
  case $1 in
  etcd) echo $ETCD_PORT ;;
  kube-apiserver) echo $APISERVER_PORT ;;
  kube-controller-manager) echo $CM_PORT ;;
  kube-scheduler) echo $SCHEDULER_PORT ;;
  kwok) echo $KWOK_PORT ;;
  esac
}

# The pid of a component of this rig that is alive, or nothing. A pid file whose process is
# gone, or is now some other process (its command line names no file of this run dir), counts
# as not running.
pid_of() {
  local f=$PIDS/$1.pid pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$RUN/"; then
    echo "$pid"
  fi
}

# A running component whose executable is not the one this script would start now (rebuilt,
# another etcd chosen): the rig is restarted.
stale() {
  local pid exe want
  pid=$(pid_of "$1")
  [ -n "$pid" ] || return 1
  component_args "$1"
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
  want=$(readlink -f "${ARGS[0]}")
  [ "$exe" != "$want" ]
}

# etcd's data is kept across restarts, but only for the etcd release that wrote it (an older
# release's data, e.g. Debian's 3.4 after a switch to 3.7, is moved aside).
check_etcd_data() {
  local want have
  want=$("$ETCD_BIN" --version 2>/dev/null | head -n1 || true)
  [ -n "$want" ] || fail "etcd: '$ETCD_BIN --version' failed or printed nothing"
  have=$(cat "$RUN/etcd.version" 2>/dev/null || true)
  if [ -d "$RUN/etcd" ] && [ "$have" != "$want" ]; then
    rm -rf "$RUN/etcd.old"
    mv "$RUN/etcd" "$RUN/etcd.old"
    say "etcd: its data was written by '${have:-an unknown etcd}', not '$want': moved aside to $RUN/etcd.old; starting empty"
  fi
  echo "$want" >"$RUN/etcd.version"
}

# Who listens on a TCP port of 127.0.0.1 (or any address), as ss says it.
port_holder() {
  ss -Hltnp "sport = :$1" 2>/dev/null | head -n1
}

healthy() {
  case $1 in
  etcd) curl -sf -m 3 "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | grep -q '"health":"true"' ;;
  kube-apiserver) [ "$(admin_curl -m 5 "$APISERVER/readyz" 2>/dev/null)" = ok ] ;;
  kube-controller-manager) [ "$(curl -s -m 3 -k "https://127.0.0.1:$CM_PORT/healthz" 2>/dev/null)" = ok ] ;;
  kube-scheduler) [ "$(curl -s -m 3 -k "https://127.0.0.1:$SCHEDULER_PORT/healthz" 2>/dev/null)" = ok ] ;;
  kwok) [ "$(curl -s -m 3 --cacert "$PKI/ca.crt" "https://127.0.0.1:$KWOK_PORT/healthz" 2>/dev/null)" = ok ] ;;
  esac
}

admin_curl() {
  curl -sS --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "$@"
}

# Sets ARGS to the command line of a component.
ARGS=()
component_args() {
  case $1 in
  etcd)
    ARGS=("$ETCD_BIN" --name k8s-rig --data-dir "$RUN/etcd" --logger zap --log-outputs stderr
      --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT"
      --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT"
      --initial-cluster "k8s-rig=http://127.0.0.1:$ETCD_PEER_PORT" --initial-cluster-state new)
    ;;
  kube-apiserver)
    # shellcheck disable=SC2054 # the commas are inside flag values
    ARGS=("$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT"
      --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$APISERVER_PORT"
      --endpoint-reconciler-type=none
      --cert-dir="$RUN/apiserver-certs"
      --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key"
      --client-ca-file="$PKI/ca.crt" --authorization-mode=Node,RBAC
      --service-cluster-ip-range="$SERVICE_CIDR" --allow-privileged=true
      --service-account-issuer="https://kubernetes.default.svc.cluster.local"
      --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key"
      --kubelet-client-certificate="$PKI/admin.crt" --kubelet-client-key="$PKI/admin.key"
      --requestheader-client-ca-file="$PKI/ca.crt" --requestheader-allowed-names=front-proxy-client
      --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group
      --requestheader-extra-headers-prefix=X-Remote-Extra-
      --proxy-client-cert-file="$PKI/front-proxy-client.crt" --proxy-client-key-file="$PKI/front-proxy-client.key"
      --profiling=false)
    ;;
  kube-controller-manager)
    # shellcheck disable=SC2054 # the commas are inside flag values
    ARGS=("$BIN/kube-controller-manager" --kubeconfig="$RUN/controller-manager.kubeconfig"
      --authentication-kubeconfig="$RUN/controller-manager.kubeconfig"
      --authorization-kubeconfig="$RUN/controller-manager.kubeconfig"
      --bind-address=127.0.0.1 --secure-port="$CM_PORT" --cert-dir="$RUN/controller-manager-certs"
      --controllers='*' --use-service-account-credentials=true --leader-elect=false
      --root-ca-file="$PKI/ca.crt" --service-account-private-key-file="$PKI/sa.key"
      --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key"
      --service-cluster-ip-range="$SERVICE_CIDR"
      --authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics --profiling=false)
    ;;
  kube-scheduler)
    ARGS=("$BIN/kube-scheduler" --kubeconfig="$RUN/scheduler.kubeconfig"
      --authentication-kubeconfig="$RUN/scheduler.kubeconfig"
      --authorization-kubeconfig="$RUN/scheduler.kubeconfig"
      --bind-address=127.0.0.1 --secure-port="$SCHEDULER_PORT" --cert-dir="$RUN/scheduler-certs"
      --leader-elect=false --profiling=false)
    ;;
  kwok)
    ARGS=("$BIN/kwok" --kubeconfig="$KUBECONFIG_FILE" --config="$CACHE_DIR/kwok-stages.yaml"
      --manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake
      --cidr="$POD_CIDR" --node-ip=127.0.0.1 --node-port="$KWOK_PORT"
      --server-address="127.0.0.1:$KWOK_PORT"
      --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key"
      --node-lease-duration-seconds=40)
    ;;
  esac
}

# Starts a component unless it already runs; then waits for it to answer.
start_component() {
  local name=$1 timeout=$2 pid port holder log started
  port=$(port_of "$name")
  log=$(log_of "$name")
  pid=$(pid_of "$name")
  if [ -n "$pid" ]; then
    if healthy "$name"; then
      say "$name: already running (pid $pid, 127.0.0.1:$port)"
      return
    fi
    say "$name: running (pid $pid) but not answering yet; waiting for it"
  else
    holder=$(port_holder "$port")
    if [ -n "$holder" ]; then
      fail "$name: port $port is taken by a process that is not this rig's: $holder"
    fi
    if [ "$name" = etcd ] && holder=$(port_holder "$ETCD_PEER_PORT") && [ -n "$holder" ]; then
      fail "etcd: peer port $ETCD_PEER_PORT is taken by a process that is not this rig's: $holder"
    fi
    [ -f "$log" ] && mv -f "$log" "$log.1"
    component_args "$name"
    echo "# $(date -u +%FT%TZ) ${ARGS[*]}" >"$log"
    # 9>&-: the component must not inherit (and so hold for ever) the lock of this script.
    setsid nohup "${ARGS[@]}" >>"$log" 2>&1 </dev/null 9>&- &
    echo $! >"$PIDS/$name.pid"
    pid=$!
    say "$name: started (pid $pid, 127.0.0.1:$port, log: $log)"
  fi
  started=$(now)
  until healthy "$name"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDS/$name.pid"
      echo "k8s-rig: FAILED: $name exited while starting" >&2
      show_log "$name" 40
      exit 1
    fi
    if [ $(($(now) - started)) -ge "$timeout" ]; then
      echo "k8s-rig: FAILED: $name did not answer on 127.0.0.1:$port within $timeout s" >&2
      show_log "$name" 40
      exit 1
    fi
    sleep 0.5
  done
  say "$name: ready ($(since "$started"))"
}

stop_component() {
  local name=$1 pid
  pid=$(pid_of "$name")
  if [ -z "$pid" ]; then
    rm -f "$PIDS/$name.pid"
    say "$name: not running"
    return
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
    say "$name: stopped (pid $pid, killed after 15 s)"
  else
    say "$name: stopped (pid $pid)"
  fi
  rm -f "$PIDS/$name.pid"
}

# ---------------------------------------------------------------------------------------------
# API helpers (curl as the admin)

RESP=""
# kapi METHOD PATH [BODY [CONTENT-TYPE]]: prints the HTTP status; the body is in $RESP.
kapi() {
  local method=$1 path=$2 body=${3:-} ctype=${4:-application/json}
  local args=(-s -m 20 -o "$RESP" -w '%{http_code}' -X "$method")
  [ -z "$body" ] || args+=(-H "Content-Type: $ctype" --data-binary "$body")
  admin_curl "${args[@]}" "$APISERVER$path" 2>/dev/null || true
}

node_json() {
  local name=$1
  jq -cn --arg name "$name" --arg cpu "$NODE_CPU" --arg mem "$NODE_MEMORY" --arg pods "$NODE_PODS" '{
    apiVersion: "v1", kind: "Node",
    metadata: {
      name: $name,
      annotations: {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
      labels: {"type": "kwok", "kubernetes.io/hostname": $name, "kubernetes.io/os": "linux",
               "kubernetes.io/arch": "amd64", "node-role.kubernetes.io/agent": ""}
    },
    spec: {taints: [{key: "kwok.x-k8s.io/node", value: "fake", effect: "NoSchedule"}]},
    status: {
      allocatable: {cpu: $cpu, memory: $mem, pods: $pods},
      capacity: {cpu: $cpu, memory: $mem, pods: $pods}
    }
  }'
}

# kwok's nodes that are Ready, carry no node.kubernetes.io/ taint (not-ready, unreachable...)
# and whose Lease kwok renewed within its duration: the nodes that pods can be placed on now.
ready_nodes() {
  local code leases
  code=$(kapi GET "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases")
  [ "$code" = 200 ] || return 0
  leases=$(jq -c '[.items[] | select(.spec.renewTime != null)
    | select((.spec.renewTime | sub("\\.[0-9]+Z$"; "Z") | fromdateiso8601) > (now - (.spec.leaseDurationSeconds // 40)))
    | .metadata.name]' "$RESP")
  code=$(kapi GET "/api/v1/nodes")
  [ "$code" = 200 ] || return 0
  jq -r --argjson fresh "$leases" '.items[] | select(.metadata.annotations["kwok.x-k8s.io/node"] == "fake")
    | select(any(.status.conditions[]?; .type == "Ready" and .status == "True"))
    | select(all(.spec.taints[]?; .key | startswith("node.kubernetes.io/") | not))
    | select(.metadata.name as $n | $fresh | index($n))
    | .metadata.name' "$RESP"
}

# A kwok that starts waits for the node Leases of the one before it (another holder identity) to
# expire, up to 40 s, before it serves those nodes: remove them, and it takes them at once.
release_node_leases() {
  local n code
  for n in "${NODES[@]}"; do
    code=$(kapi DELETE "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/$n")
    case $code in
    200 | 404) ;;
    *) fail "deleting the Lease of $n (kube-node-lease): HTTP $code: $(cat "$RESP")" ;;
    esac
  done
}

ensure_nodes() {
  local n code started
  for n in "${NODES[@]}"; do
    code=$(kapi GET "/api/v1/nodes/$n")
    if [ "$code" = 200 ]; then
      continue
    fi
    code=$(kapi POST /api/v1/nodes "$(node_json "$n")")
    case $code in
    201) say "node $n: created (cpu $NODE_CPU, memory $NODE_MEMORY, pods $NODE_PODS; taint kwok.x-k8s.io/node=fake:NoSchedule)" ;;
    409) ;;
    *) fail "node $n: the apiserver answered $code to its creation: $(cat "$RESP")" ;;
    esac
  done
  started=$(now)
  while :; do
    local ready
    ready=$(ready_nodes | wc -l)
    [ "$ready" -lt ${#NODES[@]} ] || break
    if [ $(($(now) - started)) -ge 60 ]; then
      echo "k8s-rig: FAILED: only $ready of ${#NODES[@]} kwok nodes became Ready (untainted, Lease renewed) within 60 s (kwok marks them Ready)" >&2
      show_log kwok 30
      exit 1
    fi
    sleep 0.5
  done
  say "nodes: ${NODES[*]} Ready ($(since "$started"))"
}

# ---------------------------------------------------------------------------------------------
# subcommands

all_healthy() {
  local c
  for c in "${COMPONENTS[@]}"; do
    [ -n "$(pid_of "$c")" ] && healthy "$c" || return 1
  done
  [ "$(ready_nodes | wc -l)" -ge ${#NODES[@]} ]
}

print_env() {
  echo "export KUBECONFIG=$KUBECONFIG_FILE"
  echo "export MICROSCALER_K8S_APISERVER=$APISERVER"
}

print_summary() {
  say "apiserver $APISERVER  (etcd 127.0.0.1:$ETCD_PORT/$ETCD_PEER_PORT, controller-manager :$CM_PORT, scheduler :$SCHEDULER_PORT, kwok :$KWOK_PORT)"
  say "kubeconfig $KUBECONFIG_FILE  (admin, O=system:masters); kubectl $RUN/kubectl; logs in $LOGS"
}

cmd_start() {
  local started
  started=$(now)
  RESP=$(mktemp)
  trap 'rm -f "$RESP"' EXIT
  if ! binaries_present; then
    cmd_build
  fi
  # The tests find this version's kubectl beside the kubeconfig.
  mkdir -p "$RUN"
  ln -sfn "$BIN/kubectl" "$RUN/kubectl"
  local c restart=()
  for c in "${COMPONENTS[@]}"; do
    if stale "$c"; then restart+=("$c"); fi
  done
  if [ ${#restart[@]} -gt 0 ]; then
    say "${restart[*]}: running an executable since rebuilt or replaced; restarting the rig"
    cmd_stop
  elif [ -s "$PKI/admin.crt" ] && all_healthy; then
    say "already up and healthy"
    print_summary
    return
  fi
  mkdir -p "$RUN" "$LOGS" "$PIDS"
  make_pki
  make_kubeconfigs
  [ -n "$(pid_of etcd)" ] || check_etcd_data
  start_component etcd 30
  start_component kube-apiserver 120
  start_component kube-controller-manager 60
  start_component kube-scheduler 60
  [ -n "$(pid_of kwok)" ] || release_node_leases
  start_component kwok 60
  ensure_nodes
  say "up in $(since "$started")"
  print_summary
}

cmd_stop() {
  local i
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    stop_component "${COMPONENTS[$i]}"
  done
}

cmd_reset() {
  cmd_stop
  case $RUN in
  /var/lib/microscaler-ci/k8s/run | "$RIG_DIR"/run) ;;
  *) [ -f "$RUN/admin.kubeconfig" ] || [ -d "$RUN/pki" ] || fail "reset: $RUN does not look like a rig run dir; not removing it" ;;
  esac
  rm -rf "$RUN"
  say "reset: removed $RUN (the binaries in $BIN are kept)"
}

cmd_status() {
  local c pid state rc=0
  RESP=$(mktemp)
  trap 'rm -f "$RESP"' EXIT
  for c in "${COMPONENTS[@]}"; do
    pid=$(pid_of "$c")
    if [ -z "$pid" ]; then
      state="not running"
      rc=1
    elif healthy "$c"; then
      state="running, healthy (pid $pid)"
    else
      state="running (pid $pid) but NOT answering"
      rc=1
    fi
    printf 'k8s-rig: %-24s 127.0.0.1:%-6s %s  (log: %s)\n' "$c" "$(port_of "$c")" "$state" "$(log_of "$c")"
  done
  if [ -n "$(pid_of kube-apiserver)" ] && healthy kube-apiserver; then
    local ready
    ready=$(ready_nodes | tr '\n' ' ')
    say "kwok nodes Ready: ${ready:-none}"
    [ "$(echo "$ready" | wc -w)" -ge ${#NODES[@]} ] || rc=1
    kapi GET /version >/dev/null && say "apiserver version: $(jq -r .gitVersion "$RESP")"
  fi
  print_summary
  if [ $rc = 0 ]; then say "status: up and healthy"; else say "status: NOT up (scripts/k8s-rig.sh start)"; fi
  return $rc
}

# -- check ------------------------------------------------------------------------------------

CHECK_NS=""
check_fail() {
  echo "k8s-rig: check FAILED: $*" >&2
  if [ -n "$CHECK_NS" ]; then
    echo "---- pods of $CHECK_NS ----" >&2
    kapi GET "/api/v1/namespaces/$CHECK_NS/pods" >/dev/null
    jq -r '.items[]? | "\(.metadata.name) node=\(.spec.nodeName // "-") phase=\(.status.phase) " +
      ([.status.conditions[]? | "\(.type)=\(.status)\(if .reason then "(\(.reason))" else "" end)"] | join(","))' "$RESP" >&2 || true
    echo "---- events of $CHECK_NS ----" >&2
    kapi GET "/api/v1/namespaces/$CHECK_NS/events" >/dev/null
    jq -r '.items[]? | "\(.involvedObject.kind)/\(.involvedObject.name): \(.reason): \(.message)"' "$RESP" | tail -n 20 >&2 || true
    echo "(namespace $CHECK_NS is left for inspection; scripts/k8s-rig.sh check makes a new one each run)" >&2
  fi
  echo "logs: $(log_of kube-controller-manager) $(log_of kube-scheduler) $(log_of kwok) $(log_of kube-apiserver)" >&2
  exit 1
}

# Pods of the check's Deployment: "READY-ON-KWOK PENDING-UNSCHEDULABLE TOTAL" (not terminating).
pod_counts() {
  kapi GET "/api/v1/namespaces/$CHECK_NS/pods?labelSelector=app%3Drig-check" >/dev/null
  jq -r '[.items[] | select(.metadata.deletionTimestamp == null)] |
    [ (map(select((.spec.nodeName // "" | startswith("kwok-node-")) and
                  any(.status.conditions[]?; .type == "Ready" and .status == "True"))) | length),
      (map(select(any(.status.conditions[]?; .type == "PodScheduled" and .status == "False" and .reason == "Unschedulable"))) | length),
      length ] | map(tostring) | join(" ")' "$RESP"
}

# wait_pods READY UNSCHEDULABLE TIMEOUT
wait_pods() {
  local want_ready=$1 want_unsched=$2 timeout=$3 started ready unsched total
  started=$(now)
  while :; do
    read -r ready unsched total <<<"$(pod_counts)"
    if [ "$ready" = "$want_ready" ] && [ "$unsched" = "$want_unsched" ] && [ "$total" = $((want_ready + want_unsched)) ]; then
      break
    fi
    [ $(($(now) - started)) -lt "$timeout" ] ||
      check_fail "wanted $want_ready pods Ready on kwok nodes and $want_unsched Unschedulable; after $timeout s: $ready Ready, $unsched Unschedulable, $total in all"
    sleep 0.5
  done
  since "$started"
}

scale_to() {
  local n=$1 code
  code=$(kapi PATCH "/apis/apps/v1/namespaces/$CHECK_NS/deployments/rig-check/scale" \
    "{\"spec\":{\"replicas\":$n}}" application/merge-patch+json)
  [ "$code" = 200 ] || check_fail "PATCH deployments/rig-check/scale to $n: HTTP $code: $(cat "$RESP")"
  [ "$(jq -r .spec.replicas "$RESP")" = "$n" ] || check_fail "the scale subresource did not take replicas $n: $(cat "$RESP")"
}

cmd_check() {
  local started code t slots=$((${#NODES[@]} * NODE_PODS))
  started=$(now)
  RESP=$(mktemp)
  trap 'rm -f "$RESP"' EXIT
  all_healthy || fail "check: the rig is not up and healthy (scripts/k8s-rig.sh status; scripts/k8s-rig.sh start)"

  CHECK_NS=rig-check-$(date +%s)-$$
  code=$(kapi POST /api/v1/namespaces "{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{\"name\":\"$CHECK_NS\"}}")
  [ "$code" = 201 ] || check_fail "create namespace $CHECK_NS: HTTP $code: $(cat "$RESP")"
  say "check: namespace $CHECK_NS created"

  # The ServiceAccount admission plugin refuses pods until the namespace's default
  # ServiceAccount exists (the controller-manager makes it): wait for it, as a client should.
  t=$(now)
  until [ "$(kapi GET "/api/v1/namespaces/$CHECK_NS/serviceaccounts/default")" = 200 ]; do
    [ $(($(now) - t)) -lt 30 ] || check_fail "no default ServiceAccount in $CHECK_NS within 30 s (controller-manager's serviceaccount controller)"
    sleep 0.2
  done
  say "check: default ServiceAccount made by the controller-manager ($(since "$t"))"

  local deploy
  deploy=$(jq -cn --arg ns "$CHECK_NS" '{
    apiVersion: "apps/v1", kind: "Deployment",
    metadata: {name: "rig-check", namespace: $ns},
    spec: {
      replicas: 2,
      selector: {matchLabels: {app: "rig-check"}},
      template: {
        metadata: {labels: {app: "rig-check"}},
        spec: {
          tolerations: [{key: "kwok.x-k8s.io/node", operator: "Exists", effect: "NoSchedule"}],
          containers: [{name: "app", image: "registry.invalid/rig-check:none",
                        resources: {requests: {cpu: "100m", memory: "64Mi"}}}]
        }
      }
    }
  }')
  code=$(kapi POST "/apis/apps/v1/namespaces/$CHECK_NS/deployments" "$deploy")
  [ "$code" = 201 ] || check_fail "create deployment rig-check: HTTP $code: $(cat "$RESP")"
  t=$(wait_pods 2 0 60)
  say "check: Deployment of 2 replicas: 2 pods scheduled on kwok nodes and Ready ($t)"

  scale_to 4
  t=$(wait_pods 4 0 60)
  say "check: PATCH deployments/rig-check/scale to 4: 4 pods Ready ($t)"

  # The scheduler honours the nodes' pod capacity: $slots slots, so one more stays Pending.
  scale_to $((slots + 1))
  t=$(wait_pods $slots 1 90)
  say "check: scale to $((slots + 1)): $slots Ready, 1 Pending Unschedulable (${#NODES[@]} nodes x $NODE_PODS pods) ($t)"

  kapi GET "/api/v1/namespaces/$CHECK_NS/pods?labelSelector=app%3Drig-check" >/dev/null
  say "check: pods per node: $(jq -r '[.items[] | .spec.nodeName // "none"] | group_by(.) | map("\(.[0])=\(length)") | join(" ")' "$RESP")"

  code=$(kapi DELETE "/api/v1/namespaces/$CHECK_NS")
  [ "$code" = 200 ] || [ "$code" = 202 ] || check_fail "delete namespace $CHECK_NS: HTTP $code: $(cat "$RESP")"
  t=$(now)
  until [ "$(kapi GET "/api/v1/namespaces/$CHECK_NS")" = 404 ]; do
    [ $(($(now) - t)) -lt 90 ] || check_fail "namespace $CHECK_NS still there 90 s after its deletion (namespace controller; kwok deletes the pods)"
    sleep 0.5
  done
  say "check: namespace $CHECK_NS deleted and gone ($(since "$t"))"
  CHECK_NS=""
  say "check: OK: controller-manager, scheduler and kwok all work ($(since "$started"))"
}

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  echo "ports: apiserver $APISERVER_PORT, etcd $ETCD_PORT/$ETCD_PEER_PORT, controller-manager $CM_PORT, scheduler $SCHEDULER_PORT, kwok $KWOK_PORT (all 127.0.0.1)"
}

main() {
  local sub=${1:-}
  case $sub in
  build | start | stop | reset)
    [ "$(id -u)" = 0 ] || fail "$sub must run as root"
    take_lock
    "cmd_$sub"
    ;;
  check)
    take_lock
    cmd_check
    ;;
  status) cmd_status ;;
  env) print_env ;;
  -h | --help | help) usage ;;
  *)
    usage >&2
    exit 2
    ;;
  esac
}

main "$@"
