#!/usr/bin/env bash
# Starts the servers the demand sources' tests talk to, all on 127.0.0.1. Sourced by
# scripts/services.sh after the packages are installed; idempotent: a server that already
# answers is left alone; each new one is waited for until it answers (bounded).
#
#   redis       6379
#   rabbitmq    5672 (AMQP), 15672 (management API, guest/guest)
#   prometheus  9090
#   haproxy     8404 (stats: /stats;csv, /metrics), 8405 (a frontend that answers 200)
#   nginx       8480 (/nginx_status, /json/* fixed JSON answers)
#   nats        4222, 8222 (monitoring, /jsz)
#   moto        5000 (AWS APIs; in a venv under $CI_STATE/moto-venv)
set -euo pipefail

CI_STATE=${MICROSCALER_CI_STATE:-/var/lib/microscaler-ci}
mkdir -p "$CI_STATE"

# wait_for NAME SECONDS LOG COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local name=$1 secs=$2 log=$3
  shift 3
  for _ in $(seq 1 $((secs * 5))); do
    if "$@" >/dev/null 2>&1; then
      echo "$name: ready"
      return 0
    fi
    sleep 0.2
  done
  echo "$name did not answer within $secs s; the end of its log ($log):" >&2
  tail -n 30 "$log" >&2 || true
  exit 1
}

http_ok() { curl -fsS --max-time 2 "$1" >/dev/null 2>&1; }

start_redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
    echo "redis: already running"
    return
  fi
  echo "redis: starting on 127.0.0.1:6379"
  redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save '' --appendonly no \
    --logfile "$CI_STATE/redis.log"
  wait_for redis 10 "$CI_STATE/redis.log" sh -c 'redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG'
}

start_rabbitmq() {
  if http_ok http://guest:guest@127.0.0.1:15672/api/overview; then
    echo "rabbitmq: already running"
    return
  fi
  # Loopback only; statistics every second so queue depths in the management API are fresh.
  cat >/etc/rabbitmq/rabbitmq.conf <<'EOF'
listeners.tcp.default = 127.0.0.1:5672
management.tcp.ip = 127.0.0.1
management.tcp.port = 15672
collect_statistics_interval = 1000
EOF
  cat >/etc/rabbitmq/rabbitmq-env.conf <<'EOF'
NODE_IP_ADDRESS=127.0.0.1
ERL_EPMD_ADDRESS=127.0.0.1
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  rabbitmq-plugins enable --offline rabbitmq_management >/dev/null
  echo "rabbitmq: starting (log: /var/log/rabbitmq/)"
  ERL_EPMD_ADDRESS=127.0.0.1 rabbitmq-server -detached >/dev/null 2>&1 || true
  timeout 60 rabbitmqctl await_startup >/dev/null 2>&1 || true
  wait_for rabbitmq 60 /var/log/rabbitmq/rabbit@"$(hostname -s)".log \
    http_ok http://guest:guest@127.0.0.1:15672/api/overview
}

start_prometheus() {
  if http_ok http://127.0.0.1:9090/-/ready; then
    echo "prometheus: already running"
    return
  fi
  mkdir -p "$CI_STATE/prometheus"
  cat >"$CI_STATE/prometheus.yml" <<'EOF'
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: ["127.0.0.1:9090"]
EOF
  echo "prometheus: starting on 127.0.0.1:9090"
  nohup prometheus --config.file="$CI_STATE/prometheus.yml" --web.listen-address=127.0.0.1:9090 \
    --storage.tsdb.path="$CI_STATE/prometheus" >"$CI_STATE/prometheus.log" 2>&1 &
  wait_for prometheus 30 "$CI_STATE/prometheus.log" http_ok http://127.0.0.1:9090/-/ready
}

start_haproxy() {
  if http_ok 'http://127.0.0.1:8404/stats;csv'; then
    echo "haproxy: already running"
    return
  fi
  cat >"$CI_STATE/haproxy.cfg" <<'EOF'
global
  pidfile /var/lib/microscaler-ci/haproxy.pid
defaults
  mode http
  timeout connect 2s
  timeout client 5s
  timeout server 5s
frontend stats
  bind 127.0.0.1:8404
  stats enable
  stats uri /stats
  http-request use-service prometheus-exporter if { path /metrics }
frontend web
  bind 127.0.0.1:8405
  http-request return status 200 content-type text/plain string ok
EOF
  sed -i "s#/var/lib/microscaler-ci#$CI_STATE#" "$CI_STATE/haproxy.cfg"
  echo "haproxy: starting on 127.0.0.1:8404 (stats) and :8405"
  haproxy -D -f "$CI_STATE/haproxy.cfg" >"$CI_STATE/haproxy.log" 2>&1
  wait_for haproxy 10 "$CI_STATE/haproxy.log" http_ok 'http://127.0.0.1:8404/stats;csv'
}

start_nginx() {
  if http_ok http://127.0.0.1:8480/nginx_status; then
    echo "nginx: already running"
    return
  fi
  mkdir -p "$CI_STATE/nginx/logs"
  cat >"$CI_STATE/nginx/nginx.conf" <<'EOF'
worker_processes 1;
pid nginx.pid;
error_log logs/error.log;
events { worker_connections 64; }
http {
  access_log off;
  default_type application/json;
  server {
    listen 127.0.0.1:8480;
    location = /nginx_status { stub_status; }
    location = /ok { return 200 'ok'; }
    # Fixed answers for the HTTP JSON source's tests.
    location = /json/depth { return 200 '{"queue":{"depth":42,"name":"jobs"},"list":[1,2.5]}'; }
    location = /json/string { return 200 '{"v":"17"}'; }
    location = /json/garbage { return 200 '{"v":"lots"}'; }
    location = /json/negative { return 200 '{"v":-3}'; }
    location = /json/notjson { return 200 'hello'; }
    location = /json/error { return 503 '{"error":"down"}'; }
  }
}
EOF
  echo "nginx: starting on 127.0.0.1:8480"
  nginx -c "$CI_STATE/nginx/nginx.conf" -p "$CI_STATE/nginx" >"$CI_STATE/nginx/start.log" 2>&1
  wait_for nginx 10 "$CI_STATE/nginx/logs/error.log" http_ok http://127.0.0.1:8480/nginx_status
}

start_nats() {
  if http_ok http://127.0.0.1:8222/healthz; then
    echo "nats: already running"
    return
  fi
  mkdir -p "$CI_STATE/nats"
  echo "nats: starting on 127.0.0.1:4222 (monitoring :8222)"
  nohup nats-server -js -a 127.0.0.1 -p 4222 -m 8222 -sd "$CI_STATE/nats" \
    >"$CI_STATE/nats.log" 2>&1 &
  wait_for nats 10 "$CI_STATE/nats.log" http_ok http://127.0.0.1:8222/healthz
}

start_moto() {
  if http_ok http://127.0.0.1:5000/moto-api/; then
    echo "moto: already running"
    return
  fi
  local venv="$CI_STATE/moto-venv"
  if [ ! -x "$venv/bin/moto_server" ]; then
    echo "moto: installing moto[server] into $venv (PyPI, about a minute)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check 'moto[server]' >"$CI_STATE/moto-install.log" 2>&1 || {
      tail -n 20 "$CI_STATE/moto-install.log" >&2
      exit 1
    }
  fi
  echo "moto: starting on 127.0.0.1:5000"
  nohup "$venv/bin/moto_server" -H 127.0.0.1 -p 5000 >"$CI_STATE/moto.log" 2>&1 &
  wait_for moto 30 "$CI_STATE/moto.log" http_ok http://127.0.0.1:5000/moto-api/
  # moto imports an AWS service's emulation on its first request (seconds on a fresh venv):
  # do it now for the services the tests use, not inside a test's timeout.
  local auth="AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1"
  local signed="SignedHeaders=host, Signature=0"
  curl -s -o /dev/null -X POST http://127.0.0.1:5000/ -H "Authorization: $auth/sqs/aws4_request, $signed" \
    -H 'Content-Type: application/x-www-form-urlencoded' -d 'Action=ListQueues' || true
  curl -s -o /dev/null -X POST http://127.0.0.1:5000/ -H "Authorization: $auth/ecs/aws4_request, $signed" \
    -H 'X-Amz-Target: AmazonEC2ContainerServiceV20141113.ListClusters' \
    -H 'Content-Type: application/x-amz-json-1.1' -d '{}' || true
}

start_redis
start_rabbitmq
start_prometheus
start_haproxy
start_nginx
start_nats
start_moto
