#!/usr/bin/env bash
# Builds microscaler's container image on this machine, without a registry: one static, stripped
# binary (the built-in replica is inside it) on an empty base, imported into the local Docker
# engine as microscaler:<version> and microscaler:latest.
#
#   scripts/image.sh            build and import (needs cargo, libc6-dev and a Docker engine)
#   scripts/image.sh --slim     the slim flavour, microscaler:<version>-slim and microscaler:slim:
#                               without the Kubernetes and ECS backends and the SQS source (their
#                               SDKs), for Docker, Swarm, Nomad, Marathon and processes; it maps
#                               about 5 MiB less memory (docs/systemd.md, "Memory")
#   scripts/image.sh --help
#
# Then the seeds' demo, its replicas siblings of microscaler's container:
#   docker run --rm -it -v /var/run/docker.sock:/var/run/docker.sock \
#     -p 127.0.0.1:8080:8080 microscaler:<version> demo
#
# CARGO_TARGET_DIR is honoured (the build takes minutes the first time; later ones reuse it).
set -euo pipefail
cd "$(dirname "$0")/.."

flavour=full
case "${1:-}" in
  -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  --slim) flavour=slim ;;
  "") ;;
  *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
esac

step() { printf '==> %s\n' "$*"; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
[ -n "$version" ] || { echo "cannot read the version from Cargo.toml" >&2; exit 1; }
target="$(uname -m)-unknown-linux-gnu"
target_dir="${CARGO_TARGET_DIR:-target}"
binary="$target_dir/$target/image/microscaler"
features=()
tag=$version
latest=latest
if [ "$flavour" = slim ]; then
  # Cargo keeps both flavours' artifacts apart (features are part of their hash), so building
  # one after the other in one target directory rebuilds neither.
  features=(--no-default-features)
  tag=$version-slim
  latest=slim
fi

command -v docker >/dev/null 2>&1 || { echo "the docker command is missing: install docker.io" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "the Docker engine does not answer: start dockerd (or set DOCKER_HOST)" >&2; exit 1; }
[ -f "/usr/lib/$(uname -m)-linux-gnu/libc.a" ] || { echo "a static build needs the C library's static archive: apt-get install libc6-dev" >&2; exit 1; }

step "building a static microscaler $version ($flavour) for $target (cargo profile image)"
# crt-static links glibc statically; build scripts and proc macros stay dynamic because a
# --target build compiles them for the host without these flags.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --locked --profile image --target "$target" -p microscaler "${features[@]}"
# A dynamic binary lists the libraries it needs ("libc.so.6 => ..."); a static one none.
if ldd "$binary" 2>&1 | grep -q '=>'; then
  echo "$binary is dynamically linked; the image needs a static binary" >&2
  exit 1
fi

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
install -m 0755 "$binary" "$rootfs/microscaler"
# /tmp for temporary files, /var/lib/microscaler for the state (the history) of every instance.
install -d -m 1777 "$rootfs/tmp"
install -d -m 0755 "$rootfs/var/lib/microscaler"
# Certificate authorities for HTTPS to AWS, Kubernetes or Nomad from outside their clusters.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
fi

step "importing microscaler:$tag into the engine"
tar --numeric-owner --owner=0 --group=0 -C "$rootfs" -c . | docker import \
  --change 'ENTRYPOINT ["/microscaler"]' \
  --change 'CMD ["--help"]' \
  --change 'ENV MICROSCALER_LISTEN=0.0.0.0:8080' \
  --change 'ENV XDG_STATE_HOME=/var/lib' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'EXPOSE 8080' \
  --change 'WORKDIR /tmp' \
  --change "LABEL org.opencontainers.image.title=microscaler org.opencontainers.image.version=$version io.microscaler.flavour=$flavour" \
  - "microscaler:$tag" >/dev/null
docker tag "microscaler:$tag" "microscaler:$latest"
bytes=$(docker image inspect -f '{{.Size}}' "microscaler:$tag")
step "microscaler:$tag is $((bytes / 1000000)) MB ($bytes bytes)"
