#!/usr/bin/env bash
# The slow tier (about 15 s): one image restored 100 times and one process dumped and woken
# 50 times, asserting that nothing piles up (descriptors, mappings, memory, zombies,
# guards, image size); and 50 dumps whose torpor is killed at a random moment, asserting
# that the processes come out as they were. TORPOR_STRESS_ROUNDS=N changes every count.
# Needs root, like tests/run.sh. See docs/security.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
	echo "tests/stress.sh: the stress tests dump and restore real processes; run as root" >&2
	exit 2
fi
cargo test --release -p torpor --test stress -- --ignored --test-threads=1 --nocapture
