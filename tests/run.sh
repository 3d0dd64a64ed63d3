#!/usr/bin/env bash
# The test command: unit tests and the integration tests that dump and restore real
# processes (they need root), then a short fuzz run of the image decoder when a fuzzing
# toolchain is available.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
	echo "tests/run.sh: the integration tests dump and restore real processes; run as root" >&2
	exit 2
fi
cargo test --workspace --release -- --test-threads="${TORPOR_TEST_THREADS:-4}"
if [ -x fuzz/run.sh ] && [ "${TORPOR_FUZZ_SECONDS:-30}" != 0 ]; then
	bash fuzz/run.sh "${TORPOR_FUZZ_SECONDS:-30}"
fi
