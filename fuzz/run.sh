#!/bin/sh
# Builds and runs each fuzz target of torpor's image decoders for SECONDS seconds
# (default 30). Installs cargo-fuzz when it is missing. Uses a nightly toolchain when
# rustup has one, otherwise the stable compiler with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs
# unstable compiler flags for the sanitizer and coverage instrumentation).
#
# Seeds come from seeds/<target>; what the fuzzer learns goes to corpus/<target>, and any
# crashing input to artifacts/<target>. Exits non-zero if a target panics or hangs.

set -eu

seconds=${1:-30}
case $seconds in
    '' | *[!0-9]*)
        echo "usage: $0 [SECONDS]" >&2
        exit 2
        ;;
esac

cd "$(dirname "$0")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing; installing it" >&2
    cargo install --locked cargo-fuzz
fi

if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz() { cargo +nightly fuzz "$@"; }
else
    echo "no nightly toolchain; using the stable compiler with RUSTC_BOOTSTRAP=1" >&2
    fuzz() { RUSTC_BOOTSTRAP=1 cargo fuzz "$@"; }
fi

for target in manifest tree single records frames sealed; do
    mkdir -p "corpus/$target"
    fuzz build "$target"
    # A single input taking 10 s counts as a hang.
    fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
