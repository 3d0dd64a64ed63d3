#!/usr/bin/env bash
# Live migration, side by side: how long a process writing its memory all the time is
# paused when it moves to another "host", and how many bytes move.
#
#   bash bench/migrate.sh [--size MIB] [--reps N] [--criu PATH] [--torpor PATH]   (as root)
#
# The workload is bench/mem.c in its dirty flavour (SIZE MiB of random data, rewriting
# 4 MiB a second). Both ends are on this machine, over loopback; the destination runs in
# a pid namespace of its own, as a second host would give the same pids back. Each run:
#
#   torpor       torpor migrate --to a `torpor serve --once` (pre-copy while it runs,
#                frozen for the last dirty pages and the restore on the destination)
#   torpor-lazy  the same with `torpor serve --lazy`: woken before its memory is loaded
#   criu         CRIU's page server: `criu page-server` on the destination, `criu dump
#                --page-server` (this kernel has no soft-dirty bits, so no pre-dump can
#                track what changes: the process is frozen for the whole copy), the
#                remaining image files copied over, `criu restore` there
#
# The pause is what each tool reports as frozen (torpor) or, for CRIU, from the start of
# the dump to the end of the restore (the process is frozen from the start of the dump and
# runs again at the end of the restore). Every woken process checks its whole memory.
set -uo pipefail

SIZE=256 REPS=1 CRIU="$(command -v criu || true)" TORPOR=""
while [ $# -gt 0 ]; do
	case "$1" in
	--size) SIZE="$2"; shift ;;
	--reps) REPS="$2"; shift ;;
	--criu) CRIU="$2"; shift ;;
	--no-criu) CRIU="" ;;
	--torpor) TORPOR="$2"; shift ;;
	*) echo "usage: bash bench/migrate.sh [--size MIB] [--reps N] [--criu PATH | --no-criu] [--torpor PATH]" >&2; exit 2 ;;
	esac
	shift
done
[ "$(id -u)" = 0 ] || { echo "migrate.sh: run as root" >&2; exit 2; }
BENCH="$(cd "$(dirname "$0")" && pwd)"
if [ -z "$TORPOR" ]; then
	(cd "$BENCH/.." && cargo build --release -q) || exit 1
	TORPOR="$(cd "$BENCH/.." && cargo metadata --format-version 1 --no-deps |
		python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/torpor"
fi
WORK="$(mktemp -d /tmp/torpor-migrate-bench.XXXXXX)"
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
	pkill -9 -f "^$WORK/mem " 2>/dev/null
	rm -rf "$WORK"
}
trap cleanup EXIT
gcc -O2 -o "$WORK/mem" "$BENCH/mem.c" || exit 1
PORT=$((27000 + RANDOM % 2000))

# Starts the workload; sets WPID once its memory is filled.
start_mem() {
	rm -rf "$WORK/st" && mkdir "$WORK/st"
	setsid "$WORK/mem" "$SIZE" dirty "$WORK/st" </dev/null >/dev/null 2>&1 &
	disown
	for _ in $(seq 600); do [ -s "$WORK/st/ready" ] && break; sleep 0.1; done
	WPID=$(awk '{print $2}' "$WORK/st/ready")
	sleep 2 # let it write for a while
}

# Asks the woken workload (found by its command line) to check its memory.
check_mem() {
	local p
	p=$(pgrep -f "^$WORK/mem $SIZE dirty" | head -1)
	[ -n "$p" ] || { echo "gone"; return; }
	rm -f "$WORK/st/reply"
	kill -USR1 "$p"
	for _ in $(seq 300); do [ -s "$WORK/st/reply" ] && break; sleep 0.1; done
	awk '{print $1}' "$WORK/st/reply" 2>/dev/null || echo "no reply"
	kill -9 "$p" 2>/dev/null
}

# A destination in a pid namespace of its own, whose first process outlives the command.
in_destination() {
	setsid unshare --pid --fork --mount-proc sh -c "$1; exec sleep 60" </dev/null >/dev/null 2>&1 &
	PIDS+=($!)
	disown
	sleep 0.5
}

run_torpor() { # $1: extra serve flags
	PORT=$((PORT + 1))
	start_mem
	in_destination "$TORPOR serve --listen 127.0.0.1:$PORT --insecure --once $1 >$WORK/serve.log 2>&1"
	"$TORPOR" migrate "$WPID" --to "127.0.0.1:$PORT" --insecure 2>"$WORK/migrate.log"
	sleep 1
	local line frozen sent
	line=$(grep -m1 ' migrated to ' "$WORK/migrate.log")
	frozen=$(sed -n 's/.*frozen \([0-9.]*\) ms.*/\1/p' <<<"$line")
	sent=$(sed -n 's/.*ms, \([0-9.]* [KMG]iB\) sent.*/\1/p' <<<"$line")
	printf '| %s | %s | %s | %s |\n' "$2" "${frozen:-failed}" "${sent:-?}" "$(check_mem)"
	[ -n "$frozen" ] || sed 's/^/    /' "$WORK/migrate.log" "$WORK/serve.log" >&2
}

run_criu() {
	PORT=$((PORT + 1))
	start_mem
	local src="$WORK/criu-src" dst="$WORK/criu-dst" t0 t1
	rm -rf "$src" "$dst" && mkdir "$src" "$dst"
	"$CRIU" page-server -D "$dst" --port "$PORT" -d -o "$dst/ps.log" || return
	sleep 0.3
	t0=$(date +%s%N)
	"$CRIU" dump -t "$WPID" -D "$src" --shell-job --page-server --address 127.0.0.1 \
		--port "$PORT" -o dump.log || { tail "$src/dump.log" >&2; return; }
	cp "$src"/*.img "$dst"/
	# The source's copy is gone now (CRIU's dump ends it), so its pids are free here.
	"$CRIU" restore -D "$dst" --shell-job -d -o restore.log || { tail "$dst/restore.log" >&2; return; }
	t1=$(date +%s%N)
	local bytes
	bytes=$(du -sb "$dst" | awk '{printf "%.1f MiB", $1 / 1048576}')
	printf '| criu (page server) | %s | %s | %s |\n' "$(((t1 - t0) / 1000000))" "$bytes" "$(check_mem)"
}

echo "# Live migration, ${SIZE} MiB writing 4 MiB/s, over loopback ($(date -u +%Y-%m-%d), $(uname -r), $(nproc) cores)"
echo
echo "torpor: $TORPOR ($(cd "$BENCH/.." && git rev-parse --short HEAD 2>/dev/null))"
[ -n "$CRIU" ] && echo "criu: $CRIU ($("$CRIU" --version 2>&1 | head -1))"
echo
echo "| tool | paused ms | bytes moved | woken memory |"
echo "|---|---:|---|---|"
for _ in $(seq "$REPS"); do
	run_torpor "" torpor
	run_torpor "--lazy" torpor-lazy
	[ -n "$CRIU" ] && run_criu
done
