#!/usr/bin/env bash
# Runs each cargo-fuzz target (fuzz/fuzz_targets/*.rs, libFuzzer, nightly toolchain) for a
# bounded time, starting from its committed corpus in fuzz/corpus/<target>/.
#
#   scripts/fuzz.sh                   every target, FUZZ_SECONDS (default 30) seconds each
#   scripts/fuzz.sh formula config    only these targets
#   scripts/fuzz.sh --grow [target]   add the new inputs to fuzz/corpus/<target>/ (then minimise
#                                     and commit them: see docs/fuzzing.md)
#   scripts/fuzz.sh --help
#
# Installs cargo-fuzz when it is missing (cargo install cargo-fuzz --locked). Prints, per
# target, the runs, the execs/s and the corpus size. A crash (a panic, a failed assertion, a
# timeout of 10 s on one input) fails the script with the path of the input that caused it,
# fuzz/artifacts/<target>/crash-... (replay: cargo +nightly fuzz run <target> <that path>).
# Without --grow, new inputs go to a scratch corpus beside the build, not into the checkout.
# As root (CI) the build keeps its own target outside the repository (MICROSCALER_FUZZ_TARGET,
# default /var/cache/microscaler-ci/fuzz-target), so later runs only rebuild what changed;
# otherwise CARGO_TARGET_DIR is honoured (default fuzz/target).
set -euo pipefail
cd "$(dirname "$0")/.."

grow=false
targets=()
for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --grow) grow=true ;;
    -*) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
    *) targets+=("$arg") ;;
  esac
done

seconds="${FUZZ_SECONDS:-30}"
case "$seconds" in
  ''|*[!0-9]*) echo "FUZZ_SECONDS must be a whole number of seconds, got '$seconds'" >&2; exit 2 ;;
esac

if [ "$(id -u)" = 0 ]; then
  export CARGO_TARGET_DIR="${MICROSCALER_FUZZ_TARGET:-/var/cache/microscaler-ci/fuzz-target}"
fi
target_dir="${CARGO_TARGET_DIR:-$PWD/fuzz/target}"

step() { printf '==> %s\n' "$*"; }

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "cargo fuzz needs the nightly toolchain: rustup toolchain install nightly" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  step "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

all=()
for f in fuzz/fuzz_targets/*.rs; do all+=("$(basename "$f" .rs)"); done
[ "${#targets[@]}" -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
  [ -f "fuzz/fuzz_targets/$t.rs" ] || { echo "no fuzz target $t (there are: ${all[*]})" >&2; exit 2; }
done

step "building the fuzz targets (cargo +nightly fuzz build, target dir $target_dir)"
cargo +nightly fuzz build

failed=()
for t in "${targets[@]}"; do
  committed="fuzz/corpus/$t"
  mkdir -p "$committed"
  if [ "$grow" = true ]; then
    dirs=("$committed")
  else
    scratch="$target_dir/fuzz-corpus/$t"
    mkdir -p "$scratch"
    dirs=("$scratch" "$committed")
  fi
  log="$target_dir/fuzz-$t.log"
  step "$t: ${seconds}s over ${dirs[*]}"
  # The first directory receives the new inputs; the others are only read.
  if cargo +nightly fuzz run "$t" "${dirs[@]}" -- \
    -max_total_time="$seconds" -timeout=10 -max_len=8192 -print_final_stats=1 >"$log" 2>&1; then
    # libFuzzer's last status line: "#<runs> DONE cov: .. ft: .. corp: <n>/<size> .. exec/s: <n> ..".
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n1 || true)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
    corpus=$(printf '%s' "$done_line" | sed -n 's/.*corp: \([0-9]*\)\/\([0-9]*[a-zA-Z]*\).*/\1 inputs, \2/p')
    printf '    %s runs in %ss, %s execs/s, corpus %s (%s files in %s)\n' \
      "${runs:-?}" "$seconds" "${speed:-?}" "${corpus:-?}" "$(find "$committed" -type f | wc -l)" "$committed"
  else
    # The panic (or libFuzzer's own report) and what follows it, without the backtrace.
    grep -E -A4 "panicked at|ERROR: libFuzzer|==ERROR|Test unit written" "$log" | grep -v '^ *[0-9]*: \|^ *at ' >&2 || tail -n 20 "$log" >&2
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n1)
    artifact="${artifact#"$PWD"/}"
    if [ -n "$artifact" ]; then
      echo "$t CRASHED on $artifact (replay: cargo +nightly fuzz run $t $artifact)" >&2
      failed+=("$t: $artifact")
    else
      echo "$t failed without a crash artifact (full log: $log)" >&2
      failed+=("$t: $log")
    fi
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  printf 'fuzzing failed:\n' >&2
  printf '  %s\n' "${failed[@]}" >&2
  exit 1
fi
step "fuzzing: ${#targets[@]} targets, ${seconds}s each, no crash"
