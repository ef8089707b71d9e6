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

start_dockerd() {
  if docker info >/dev/null 2>&1; then
    echo "Docker engine: already running"
    return
  fi
  # A dockerd killed earlier leaves its pid file behind and the next one refuses to start.
  if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    rm -f /var/run/docker.pid
  fi
  echo "Docker engine: starting dockerd (log: /var/log/dockerd.log)"
  nohup dockerd >/var/log/dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && { echo "Docker engine: ready"; return; }
    sleep 1
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
