#!/usr/bin/env bash
# Short cargo-fuzz runs of every target (SECONDS each, default 5), starting from the seed
# corpus in fuzz/corpus/. Installs cargo-fuzz when missing. cargo-fuzz needs nightly
# compiler flags (sanitizers); RUSTC_BOOTSTRAP lets the stable toolchain accept them.
# A crash stops the run and leaves its input under fuzz/artifacts/: turn it into a
# regression test beside the code it broke.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_PER_TARGET=${SECONDS_PER_TARGET:-5}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
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
