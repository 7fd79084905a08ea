#!/usr/bin/env bash
# Short cargo-fuzz runs of every target (SECONDS_PER_TARGET seconds each, default 5),
# starting from the seed corpus in fuzz/corpus/. Installs cargo-fuzz when missing.
# cargo-fuzz needs nightly compiler flags (sanitizers); RUSTC_BOOTSTRAP lets the active
# toolchain accept them even when it is stable, so no `+nightly` is needed and the cargo
# that checks fuzz/Cargo.lock below is the one that builds.
# A crash stops the run and leaves its input under fuzz/artifacts/: turn it into a
# regression test beside the code it broke.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_PER_TARGET=${SECONDS_PER_TARGET:-5}
case $SECONDS_PER_TARGET in
  '' | *[!0-9]* | 0) echo "fuzz/run.sh: SECONDS_PER_TARGET must be a whole number of seconds above 0, not '$SECONDS_PER_TARGET'" >&2; exit 1 ;;
esac
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
# fuzz/Cargo.lock is tracked and cargo-fuzz has no --locked: check that the lock already
# holds every dependency (then no build rewrites it) rather than let the build update it.
if ! cargo metadata --locked --format-version 1 >/dev/null; then
  echo "fuzz/run.sh: fuzz/Cargo.lock is out of date with the crates it builds; update it with" \
    "\`cargo update --workspace --manifest-path fuzz/Cargo.toml\` and commit it" >&2
  exit 1
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for target in $(cargo fuzz list); do
  scratch=$(mktemp -d)
  # New inputs go to a scratch directory; the committed seeds are only read.
  status=0
  cargo fuzz run -O "$target" "$scratch" "corpus/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" >"$scratch.log" 2>&1 || status=$?
  grep -E "^Done|SUMMARY|panicked" "$scratch.log" || true
  rm -rf "$scratch" "$scratch.log"
  if [ "$status" != 0 ]; then
    echo "fuzz target $target failed; see fuzz/artifacts/$target" >&2
    exit 1
  fi
done
echo "fuzz: $(cargo fuzz list | wc -l) targets ran ${SECONDS_PER_TARGET}s each without a crash"
