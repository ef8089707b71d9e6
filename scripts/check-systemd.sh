#!/usr/bin/env bash
# Checks deploy/systemd/: `systemd-analyze verify` on microscaler.service alone and with the
# docker.conf drop-in, then `systemd-analyze security --offline` on the unit (docs/systemd.md).
#
# The checks run on a temporary copy in which /usr/local/bin/microscaler is replaced by an
# existing binary, so a machine without microscaler installed checks everything else. Any
# warning or error line about the unit (or a non-zero exit of verify) fails the check; lines
# about other units of the machine are shown but do not count. Needs no running systemd.
# Exit: 0 all good (or systemd-analyze absent: skipped), 1 a check failed.
set -euo pipefail
cd "$(dirname "$0")/.."

UNIT=deploy/systemd/microscaler.service
DROPIN=deploy/systemd/docker.conf
# Highest accepted overall exposure of `systemd-analyze security`, times 10 (it is 1.5 now).
MAX_EXPOSURE=${MAX_EXPOSURE:-25}

if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "skip: systemd-analyze not found (install systemd to check $UNIT)"
  exit 0
fi

stand_in=
for b in /usr/bin/true /bin/true; do
  if [ -x "$b" ]; then stand_in=$b; break; fi
done
if [ -z "$stand_in" ]; then
  echo "no true binary to stand in for /usr/local/bin/microscaler" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failed=0

# `systemd-analyze verify` loads drop-ins from <dir of the unit>/microscaler.service.d/.
# $1: a directory holding microscaler.service (and its drop-ins); $2: what is checked.
verify() {
  local dir=$1 what=$2 out rc=0
  echo "==> systemd-analyze verify: $what"
  out=$(systemd-analyze verify "$dir/microscaler.service" 2>&1) || rc=$?
  if [ -n "$out" ]; then printf '%s\n' "$out"; fi
  if [ "$rc" -ne 0 ]; then
    echo "FAIL: systemd-analyze verify exited with $rc ($what)"
    failed=1
  fi
  if printf '%s\n' "$out" | grep -E "microscaler|$dir" >/dev/null; then
    echo "FAIL: systemd-analyze verify has something to say about the unit ($what)"
    failed=1
  elif [ "$rc" -eq 0 ]; then
    echo "ok"
  fi
}

mkdir -p "$tmp/plain" "$tmp/docker/microscaler.service.d"
sed "s#/usr/local/bin/microscaler#$stand_in#g" "$UNIT" >"$tmp/plain/microscaler.service"
cp "$tmp/plain/microscaler.service" "$tmp/docker/microscaler.service"
cp "$DROPIN" "$tmp/docker/microscaler.service.d/docker.conf"

verify "$tmp/plain" "$UNIT (ExecStart's microscaler replaced by $stand_in)"
verify "$tmp/docker" "$UNIT with $DROPIN as a drop-in"

# Offline review needs systemd 250 or later; older ones only review running units.
if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
  echo "==> systemd-analyze security --offline=yes: $UNIT (fails above $MAX_EXPOSURE/10)"
  rc=0
  out=$(systemd-analyze security --offline=yes --threshold="$MAX_EXPOSURE" \
    "$tmp/plain/microscaler.service" 2>&1) || rc=$?
  printf '%s\n' "$out" | grep -E 'Overall exposure|Failed|[Ww]arning|Unknown' || true
  if [ "$rc" -ne 0 ]; then
    echo "FAIL: systemd-analyze security exited with $rc"
    failed=1
  else
    echo "ok"
  fi
else
  echo "skip: this systemd-analyze has no --offline security review (systemd < 250)"
fi

if [ "$failed" -ne 0 ]; then
  exit 1
fi
echo "systemd unit checks passed"
