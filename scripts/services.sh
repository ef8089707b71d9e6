#!/usr/bin/env bash
# Installs (Debian packages) and starts the real services the tests talk to. Idempotent: a
# service that already answers is left alone. Must run as root.
set -euo pipefail

need_pkgs=()
command -v dockerd >/dev/null 2>&1 || need_pkgs+=(docker.io)
# Demand sources' servers (issue 4): brokers, metrics servers, load balancers.
command -v redis-server >/dev/null 2>&1 || need_pkgs+=(redis-server)
command -v rabbitmq-server >/dev/null 2>&1 || need_pkgs+=(rabbitmq-server)
command -v prometheus >/dev/null 2>&1 || need_pkgs+=(prometheus)
command -v haproxy >/dev/null 2>&1 || need_pkgs+=(haproxy)
command -v nginx >/dev/null 2>&1 || need_pkgs+=(nginx)
command -v nats-server >/dev/null 2>&1 || need_pkgs+=(nats-server)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
# etcd for [ha]'s tests (each starts a private one on loopback ports of its own).
command -v etcd >/dev/null 2>&1 || need_pkgs+=(etcd-server)
# The docker_cpu source's test runs containers of Debian's static busybox (no registry).
[ -x /bin/busybox ] || need_pkgs+=(busybox-static)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
# The built-in replica is linked statically: it needs the C library's static archive.
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || [ -e /usr/lib/libc.a ] || need_pkgs+=(libc6-dev)
# The dashboard's real-browser test (issue 3): headless Chromium driven through chromedriver.
[ -x /usr/bin/chromium ] || need_pkgs+=(chromium)
[ -x /usr/bin/chromedriver ] || need_pkgs+=(chromium-driver)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "apt-get install ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# Tasks the engine's containerd still holds for containers Docker no longer knows (Docker 20.10
# loses track of some when about 1,000 are removed at once; a dockerd killed while containers
# ran leaves them too). The next containerd deletes each one at start (about 25 ms each), and
# dockerd gives it only 15 s to answer.
stale_tasks() {
  local dir=/run/docker/containerd/daemon/io.containerd.runtime.v2.task/moby
  if [ -d "$dir" ]; then find "$dir" -mindepth 1 -maxdepth 1 | wc -l; else echo 0; fi
}

start_dockerd() {
  if docker info >/dev/null 2>&1; then
    echo "Docker engine: already running"
    return
  fi
  local attempt pid before cpid
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    # A dockerd killed earlier leaves its pid file behind and the next one refuses to start.
    if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
      rm -f /var/run/docker.pid
    fi
    before=$(stale_tasks)
    echo "Docker engine: starting dockerd (log: /var/log/dockerd.log; $before tasks left by an earlier engine)"
    nohup dockerd >/var/log/dockerd.log 2>&1 &
    pid=$!
    for _ in $(seq 1 60); do
      docker info >/dev/null 2>&1 && { echo "Docker engine: ready"; return; }
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    # containerd deletes the earlier engine's tasks as it starts, and what it deleted stays
    # deleted: a new start gets further. Anything else (or no progress) is a real failure.
    kill -0 "$pid" 2>/dev/null && break
    grep -q "timeout waiting for containerd to start" /var/log/dockerd.log || break
    [ "$(stale_tasks)" -lt "$before" ] || break
    # The containerd that dockerd started can outlive it; the next dockerd would wait for it.
    cpid=$(cat /var/run/docker/containerd/containerd.pid 2>/dev/null || true)
    if [ -n "$cpid" ] && kill -0 "$cpid" 2>/dev/null; then
      kill "$cpid" 2>/dev/null || true
      for _ in $(seq 1 20); do kill -0 "$cpid" 2>/dev/null || break; sleep 0.5; done
    fi
    echo "Docker engine: its containerd was still deleting tasks an earlier engine left" \
      "($(stale_tasks) to go) when dockerd stopped waiting for it (attempt $attempt); starting it again"
  done
  echo "Docker engine did not answer within 60 s; the end of its log:" >&2
  tail -n 30 /var/log/dockerd.log >&2
  exit 1
}

start_swarm() {
  local state
  state=$(docker info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null || true)
  if [ "$state" = active ]; then
    echo "Docker Swarm: already active"
    return
  fi
  docker swarm init --advertise-addr 127.0.0.1 >/dev/null
  echo "Docker Swarm: initialised (single node)"
}

start_dockerd
start_swarm
# Demand sources (see scripts/source-services.sh).
. "$(dirname "$0")/source-services.sh"
# The Kubernetes test rig (issue 10): etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kwok on 127.0.0.1, built from Go modules and cached outside the
# repository (docs/kubernetes-rig.md). A cold build takes about 8 min here; cached, 0.3 s.
"$(dirname "$0")/k8s-rig.sh" start
