#!/usr/bin/env bash
# The whole test suite, from a clean clone of a Debian machine.
#
# As root (or through sudo) it installs and starts what the tests need (Docker Engine from Debian's docker.io,
# dockerd on the default socket, a single-node swarm) and is idempotent when they already run.
# Then it checks formatting, lints, the purity of the core crate, and runs every test.
# CI=true (the default here) makes a test whose service is missing fail instead of skip.
set -euo pipefail
cd "$(dirname "$0")/.."
export CI="${CI:-true}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n==> %s (%s free on the build disk)\n' "$*" "$(df -h --output=avail . | tail -n1 | tr -d ' ')"; }

# A one-shot run keeps no incremental state (it is as large as the build and never reused).
if [ "$CI" = true ]; then
  export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
fi

# The services need root; the build and the tests do not. As root they are installed here;
# otherwise through sudo when it is there (the tests then run as this user).
if [ "$(id -u)" = 0 ]; then
  step "installing test services (Debian packages)"
  scripts/services.sh
elif command -v sudo >/dev/null 2>&1; then
  step "installing test services (Debian packages, through sudo)"
  sudo --preserve-env=CI scripts/services.sh
else
  echo "not root and no sudo: not installing or starting services; tests that need them will fail under CI=true" >&2
fi

step "formatting (cargo fmt --check)"
cargo fmt --all -- --check

step "lints (cargo clippy -D warnings)"
cargo clippy --locked --workspace --all-targets -- -D warnings

step "the core crate stays pure (no async runtime, HTTP or Docker client)"
if cargo tree --locked -p microscaler-core -e normal --prefix none | grep -E '^(tokio|hyper|bollard|reqwest|axum) ' ; then
  echo "microscaler-core must not depend on the crates above" >&2
  exit 1
fi

step "the systemd unit (systemd-analyze verify and security)"
scripts/check-systemd.sh

step "microscaler's container images (scripts/image.sh, and --slim)"
# Their static, size-optimised build is slow the first time (about 20 minutes on 2 cores): as
# root it keeps its own cargo target outside the repository, so later runs only rebuild what
# changed. The slim flavour shares every dependency built the same way.
for flavour in "" --slim; do
  if [ "$(id -u)" = 0 ]; then
    CARGO_TARGET_DIR="${MICROSCALER_IMAGE_TARGET:-/var/cache/microscaler-ci/image-target}" scripts/image.sh $flavour
  else
    scripts/image.sh $flavour
  fi
done

step "the multi-node Docker Swarm rig (scripts/swarm-rig.sh start; stopped when this script ends)"
# Three engines in network namespaces of their own (docs/swarm-rig.md), for tests/swarm_nodes.rs.
# The tests also start it themselves (idempotent) and load this build's replica image on it.
if [ "$(id -u)" = 0 ]; then
  scripts/swarm-rig.sh start
  trap 'scripts/swarm-rig.sh stop || true' EXIT
elif command -v sudo >/dev/null 2>&1; then
  sudo scripts/swarm-rig.sh start
  trap 'sudo scripts/swarm-rig.sh stop || true' EXIT
fi

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast
  cargo test --locked --workspace --doc
else
  cargo test --locked --workspace --no-fail-fast
fi
step "fuzzing (scripts/fuzz.sh: each cargo-fuzz target for FUZZ_SECONDS, 20 s here, over its committed corpus)"
FUZZ_SECONDS="${FUZZ_SECONDS:-20}" scripts/fuzz.sh

step "schemathesis against the API's OpenAPI document (bounded: 60 s, a fixed seed)"
scripts/schemathesis.sh

step "all tests passed"
du -sh target 2>/dev/null || true
