#!/usr/bin/env bash
# Schemathesis against a running microscaler's OpenAPI document (issue 14): every operation of
# /api/v1/openapi.json is called with generated valid and invalid requests (examples, coverage,
# fuzzing and stateful phases, every check: no 5xx, documented status codes and content types,
# answers that match their schemas, invalid input refused, valid input accepted), with the
# token, against a real `microscaler run` on the process backend. Bounded by --max-examples
# per operation and a time budget. /api/v1/stream (server-sent events, endless) is left out.
#
#   scripts/schemathesis.sh [--examples N] [--max-time SECONDS] [--seed N|random] [--binary PATH]
#
# The seed is fixed by default (SCHEMATHESIS_SEED), so a run in CI tries what the last one
# did; `--seed random` explores (the seed is printed to replay a failure).
#
# Schemathesis comes from PyPI into a venv keyed by its version, kept outside the repository
# ($MICROSCALER_CI_STATE, default /var/lib/microscaler-ci as root, else ~/.cache/microscaler),
# so later runs only start it. Exit status: schemathesis's (non-zero on any failure).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=4.32.5
EXAMPLES=${SCHEMATHESIS_EXAMPLES:-40}
MAX_TIME=${SCHEMATHESIS_MAX_TIME:-60}
SEED=${SCHEMATHESIS_SEED:-20261206}
BINARY=

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --examples) EXAMPLES=$2; shift 2 ;;
    --max-time) MAX_TIME=$2; shift 2 ;;
    --binary) BINARY=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "schemathesis.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" = 0 ]; then
  STATE=${MICROSCALER_CI_STATE:-/var/lib/microscaler-ci}
else
  STATE=${MICROSCALER_CI_STATE:-$HOME/.cache/microscaler}
fi
VENV=$STATE/schemathesis-$VERSION
# Built where it stays (a venv's scripts name its path: one built elsewhere and moved cannot
# run), and marked complete only once the install succeeded.
if [ ! -f "$VENV/.installed" ]; then
  echo "schemathesis: installing $VERSION into $VENV (PyPI, about 30 s)"
  mkdir -p "$STATE"
  rm -rf "$VENV" "$VENV.tmp"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$VERSION" \
    >"$STATE/schemathesis-install.log" 2>&1 || {
    tail -n 20 "$STATE/schemathesis-install.log" >&2
    echo "schemathesis: pip install failed (is PyPI reachable?); full log: $STATE/schemathesis-install.log" >&2
    exit 1
  }
  touch "$VENV/.installed"
fi

if [ -z "$BINARY" ]; then
  cargo build --locked -q -p microscaler --bin microscaler
  BINARY=${CARGO_TARGET_DIR:-target}/debug/microscaler
fi

WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
TOKEN=schemathesis-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')
cat >"$WORK/api.toml" <<EOF
instance = "schemathesis-$PORT"
tick = "500ms"
on_exit = "stop"
[capacity]
slots = 4
[backend]
type = "process"
[server]
listen = "127.0.0.1:$PORT"
[[services]]
name = "web"
priority = 1
[[services.triggers]]
type = "manual"
initial = 1
[[services]]
name = "walk"
priority = 2
[[services.triggers]]
type = "random"
max = 2
[[services]]
name = "batch"
priority = 3
remainder = true
EOF

MICROSCALER_TOKEN=$TOKEN "$BINARY" run -c "$WORK/api.toml" --state-dir "$WORK/state" \
  >"$WORK/daemon.out" 2>"$WORK/daemon.log" &
DAEMON=$!
cleanup() {
  kill -TERM "$DAEMON" 2>/dev/null || true
  wait "$DAEMON" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  kill -0 "$DAEMON" 2>/dev/null || { cat "$WORK/daemon.log" >&2; echo "schemathesis: microscaler did not start" >&2; exit 1; }
  sleep 0.1
done

echo "schemathesis $VERSION against microscaler on 127.0.0.1:$PORT: at most $EXAMPLES examples per operation, $MAX_TIME s in all"
status=0
# From the scratch dir: schemathesis keeps nothing in the repository (no example database).
(cd "$WORK" && "$VENV/bin/st" run "http://127.0.0.1:$PORT/api/v1/openapi.json" \
  --url "http://127.0.0.1:$PORT" \
  -H "Authorization: Bearer $TOKEN" \
  --checks all \
  --exclude-path /api/v1/stream \
  --max-examples "$EXAMPLES" \
  --max-time "$MAX_TIME" \
  --workers 2 \
  --request-timeout 10 \
  --no-color \
  --generation-database none \
  ${SEED:+$([ "$SEED" = random ] || echo "--seed $SEED")} \
  --report junit --report-dir "$WORK/report") || status=$?
if ! kill -0 "$DAEMON" 2>/dev/null; then
  echo "schemathesis: microscaler died during the run; its log:" >&2
  tail -n 30 "$WORK/daemon.log" >&2
  status=1
fi
exit "$status"
