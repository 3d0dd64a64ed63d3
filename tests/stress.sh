#!/usr/bin/env bash
# The slow tier: one image restored 100 times, one process dumped and woken 50 times,
# asserting that nothing piles up (descriptors, mappings, memory, zombies, guards, image
# size). TORPOR_STRESS_ROUNDS=N changes both counts. Needs root, like tests/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
	echo "tests/stress.sh: the stress tests dump and restore real processes; run as root" >&2
	exit 2
fi
cargo test --release -p torpor --test stress -- --ignored --test-threads=1 --nocapture
