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
# The tests restore processes with the pids they had. With the default pid_max (32768)
# pids wrap around within minutes on a busy machine, and another test's process may take
# a dumped one's pid before its restore; a larger range makes that rare.
if [ "$(cat /proc/sys/kernel/pid_max)" -lt 4194304 ]; then
	echo 4194304 > /proc/sys/kernel/pid_max 2>/dev/null || true
fi
cargo test --workspace --release -- --test-threads="${TORPOR_TEST_THREADS:-4}"
if [ -x fuzz/run.sh ] && [ "${TORPOR_FUZZ_SECONDS:-30}" != 0 ]; then
	bash fuzz/run.sh "${TORPOR_FUZZ_SECONDS:-30}"
fi
