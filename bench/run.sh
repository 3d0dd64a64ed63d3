#!/usr/bin/env bash
# Benchmarks torpor (and CRIU, when there is one) on real workloads, next to what the
# machine's disk can do, and prints a markdown table that is also written to
# bench/results-<date>.md.
#
#   bash bench/run.sh [--quick] [--criu PATH] [options]     (as root)
#
# Workloads, each started afresh for every run:
#   mem-<flavour>-<size>  bench/mem.c holding random, half-zero or text-like memory
#                         of 256 MiB, 1 GiB and 4 GiB (--quick: 256 MiB only)
#   python-dict-2M        python3 with a 2,000,000-entry dict (bench/pydict.py)
#   redis-1M              redis-server with 1,000,000 keys loaded by redis-cli --pipe
#   maps-10k, threads-1k  bench/scale.c with 10,000 mappings, or with 1,000 threads: costs
#                         that grow with the number of mappings or threads
#   mem-dirty-1G          bench/mem.c holding 1 GiB and rewriting 4 MiB of it per second,
#                         dumped as usual, then (mem-dirty-1G-precopy) with --pre-copy
#
# With --lazy, each torpor image is also restored with `--lazy --detach` (tool
# "torpor-lazy"): the process runs before its memory is loaded, it "answers" when it
# replies to a ping (SIGUSR2; Redis: PING), and the full check follows.
#
# For each: dump wall time, frozen time (from the tool's own report), image bytes, restore
# wall time, time from the start of restore until the process answers (Redis: PING; the
# others: the reply to a full check of their memory), peak RSS of the tool, and whether the
# woken process is intact. Then dd writes and reads the same number of bytes on the same
# filesystem, buffered and with O_DIRECT, as the machine's limits.
#
# Everything the script starts is killed, reaped and removed on exit.
set -uo pipefail

usage() {
	cat <<'EOF'
usage: bash bench/run.sh [options]
  --quick            memory workloads of 256 MiB only (default: 256 MiB, 1 GiB, 4 GiB)
  --sizes LIST       memory workload sizes in MiB, comma-separated (overrides --quick)
  --workloads LIST   any of mem,python,redis,scale,precopy, comma-separated (default: all)
  --criu PATH        also run CRIU from PATH (default: criu on PATH, if any)
  --no-criu          do not run CRIU even if it is on PATH
  --torpor PATH      the torpor binary (default: cargo build --release, then its binary)
  --dump-args ARGS   more arguments for torpor dump, split on spaces (e.g. --compress=1)
  --dir DIR          where images and scratch files go (default: $TMPDIR or /tmp)
  --reps N           runs of each workload and tool, alternating tools (default: 1)
  --cold             drop the image from the page cache before each restore
  --out FILE         the results file (default: bench/results-<date>.md)
  --keep             keep the scratch directory (images of the last run of each workload)
  --lazy             also restore torpor's images lazily (torpor restore --lazy --detach)
  --flavours LIST    memory flavours, comma-separated (default: random,halfzero,text)
EOF
}

die() {
	echo "run.sh: $*" >&2
	exit 1
}

# --- options -------------------------------------------------------------------------

QUICK=0 SIZES="" WORKLOADS="mem,python,redis,scale,precopy" CRIU="" NO_CRIU=0 TORPOR="${TORPOR:-}"
BASE="${TMPDIR:-/tmp}" REPS=1 COLD=0 OUT="" KEEP=0 DUMP_ARGS="" LAZY=0 FLAVOUR_LIST=random,halfzero,text
ARGS=("$@")
while [ $# -gt 0 ]; do
	case "$1" in
	--quick) QUICK=1 ;;
	--sizes) SIZES="${2:?--sizes needs a list}"; shift ;;
	--workloads) WORKLOADS="${2:?--workloads needs a list}"; shift ;;
	--criu) CRIU="${2:?--criu needs a path}"; shift ;;
	--no-criu) NO_CRIU=1 ;;
	--torpor) TORPOR="${2:?--torpor needs a path}"; shift ;;
	--dump-args) DUMP_ARGS="${2?--dump-args needs arguments}"; shift ;;
	--dir) BASE="${2:?--dir needs a directory}"; shift ;;
	--reps) REPS="${2:?--reps needs a number}"; shift ;;
	--cold) COLD=1 ;;
	--out) OUT="${2:?--out needs a file}"; shift ;;
	--keep) KEEP=1 ;;
	--lazy) LAZY=1 ;;
	--flavours) FLAVOUR_LIST="${2:?--flavours needs a list}"; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
	shift
done
[[ "$REPS" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --reps takes a positive number" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "run.sh: dumping and restoring processes needs root" >&2; exit 2; }

PY=/usr/bin/python3
[ -x "$PY" ] || PY="$(command -v python3)" || die "python3 is needed"

# Processes woken with --detach are orphans, adopted by the nearest "child subreaper".
# Make this shell one, so that it reaps them (where pid 1 does not) and can tell its own
# processes by their parent. The flag survives execve, so python sets it and execs bash.
if [ "${TORPOR_BENCH_SUBREAPER:-}" != "$$" ]; then
	export TORPOR_BENCH_SUBREAPER=$$
	exec "$PY" -c '
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("run.sh: prctl(PR_SET_CHILD_SUBREAPER) failed")
os.execv("/bin/bash", ["bash"] + sys.argv[1:])
' "$0" "${ARGS[@]}"
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="$ROOT/bench"
if [ -z "$SIZES" ]; then
	if [ "$QUICK" = 1 ]; then SIZES=256; else SIZES=256,1024,4096; fi
fi
IFS=, read -r -a SIZE_LIST <<<"$SIZES"
for s in "${SIZE_LIST[@]}"; do
	[[ "$s" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: bad size '$s' (MiB)" >&2; exit 2; }
done
want() { [[ ",$WORKLOADS," == *",$1,"* ]]; }

DICT_ENTRIES=2000000
REDIS_KEYS=1000000
IFS=, read -r -a FLAVOURS <<<"$FLAVOUR_LIST"
for f in "${FLAVOURS[@]}"; do
	[[ "$f" =~ ^(random|halfzero|text)$ ]] || { echo "run.sh: bad flavour '$f'" >&2; exit 2; }
done
# Extra arguments of torpor dump, for the workload being run.
DUMP_EXTRA=()

# --- scratch space and cleanup -------------------------------------------------------

mkdir -p "$BASE" || die "cannot create $BASE"
WORK="$(mktemp -d "$BASE/torpor-bench.XXXXXX")" || die "cannot create a directory in $BASE"
RESULTS="$WORK/results.tsv"
LIMITS="$WORK/limits.tsv"
META="$WORK/meta.txt"
MAIN_PID=$$

# Kills and reaps every process this script started. Workloads are either its children
# or, once woken by --detach, adopted by it; both have it as parent.
kill_ours() {
	local pids pid i
	for i in 1 2 3; do
		pids=$(pgrep -P "$MAIN_PID" 2>/dev/null) || break
		for pid in $pids; do
			[ "$pid" = "$BASHPID" ] && continue
			kill -KILL "$pid" 2>/dev/null
		done
		sleep 0.2
	done
	wait 2>/dev/null
}

cleanup() {
	trap - EXIT INT TERM HUP
	kill_ours
	if [ "$KEEP" = 1 ]; then
		echo "run.sh: scratch directory kept: $WORK" >&2
	else
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT
trap 'echo "run.sh: interrupted" >&2; exit 130' INT TERM HUP

# --- small helpers -------------------------------------------------------------------

log() { printf '%s\n' "$*" >&2; }

# Seconds between two $EPOCHREALTIME readings.
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# Bash's loadable sleep saves a fork per poll where the bash-builtins package provides it.
enable -f /usr/lib/bash/sleep sleep 2>/dev/null || true

# Waits until FILE exists, polling every 2 ms, for at most SECONDS; false on timeout.
wait_file() {
	local file=$1 deadline
	deadline=$(awk -v n="$EPOCHREALTIME" -v t="$2" 'BEGIN { printf "%d", n + t }')
	while [ ! -e "$file" ]; do
		[ "${EPOCHREALTIME%.*}" -ge "$deadline" ] && return 1
		sleep 0.002
	done
}

# Waits until PID has exited and been reaped, for at most SECONDS; false on timeout.
wait_gone() {
	local pid=$1 i
	for ((i = 0; i < $2 * 100; i++)); do
		[ -e "/proc/$pid" ] || return 0
		sleep 0.01
	done
	return 1
}

# Ends PID (ours) politely, then not: SIGTERM, then SIGKILL after 10 s.
stop_pid() {
	local pid=$1
	[ -e "/proc/$pid" ] || return 0
	kill -TERM "$pid" 2>/dev/null
	wait_gone "$pid" 10 && return 0
	kill -KILL "$pid" 2>/dev/null
	wait_gone "$pid" 5 || log "  warning: pid $pid did not go away"
}

# Runs CMD... as a workload: its own session, stdin /dev/null, stdout and stderr to OUT,
# and no descriptor but 0-2 (a shell may leak some, which a dump would have to refuse).
# setsid execs without forking here (the subshell does not lead its group), so the pid
# in $LAUNCHED is the workload's.
launch() {
	local out=$1
	shift
	(
		for fd in "/proc/$BASHPID/fd"/*; do
			fd=${fd##*/}
			[ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-" 2>/dev/null
		done
		exec setsid "$@" </dev/null >"$out" 2>&1
	) &
	LAUNCHED=$!
	# Reaped all the same (as every child is), but not reported as "Killed" by bash.
	disown "$LAUNCHED"
}

# The "Maximum resident set size" from a /usr/bin/time -v report, in KiB.
maxrss() { awk -F': ' '/Maximum resident set size/ { print $2 }' "$1" 2>/dev/null; }

# Bytes the directory takes on disk.
disk_bytes() { du -s -B1 "$1" 2>/dev/null | awk '{ print $1 }'; }

mem_avail_mib() { awk '/^MemAvailable:/ { print int($2 / 1024) }' /proc/meminfo; }
disk_avail_mib() { df -P -m "$1" | awk 'NR == 2 { print $4 }'; }

# Drops a directory's files from the page cache (they were synced by the dump).
evict() {
	local f
	find "$1" -type f -print0 | while IFS= read -r -d '' f; do
		dd if="$f" iflag=nocache count=0 status=none 2>/dev/null
	done
}

# --- what is needed ------------------------------------------------------------------

if [ ! -x /usr/bin/time ]; then
	log "installing the time package for /usr/bin/time"
	(apt-get install -y time >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 &&
		apt-get install -y time >/dev/null 2>&1; }) || die "/usr/bin/time is needed (apt-get install time)"
fi
command -v gcc >/dev/null || die "gcc is needed to build bench/mem.c"
command -v timeout >/dev/null || die "timeout (coreutils) is needed"

# Which source the binary comes from, as far as can be told.
tree_rev() {
	local rev
	rev=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null) || { echo "?"; return; }
	(cd "$ROOT" && git diff --quiet HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null) ||
		rev="$rev with uncommitted changes"
	echo "$rev"
}
if [ -n "$TORPOR" ]; then
	TORPOR_FROM="given, built $(date -u -r "$TORPOR" '+%Y-%m-%d %H:%M UTC' 2>/dev/null); tree now at $(tree_rev)"
else
	TORPOR_FROM="built from $(tree_rev)"
	log "building torpor (cargo build --release)"
	(cd "$ROOT" && cargo build --release >"$WORK/build.log" 2>&1) ||
		{ tail -20 "$WORK/build.log" >&2; die "cargo build --release failed"; }
	TORPOR="${CARGO_TARGET_DIR:-$ROOT/target}/release/torpor"
fi
[ -x "$TORPOR" ] || die "no torpor binary at $TORPOR"

if [ "$NO_CRIU" = 1 ]; then
	CRIU=""
elif [ -n "$CRIU" ]; then
	[ -x "$CRIU" ] || die "--criu $CRIU is not an executable"
else
	CRIU="$(command -v criu 2>/dev/null || true)"
fi
# A CRIU that cannot start on this kernel fails every dump the same way: say so once.
CRIU_NOTE=""
if [ -n "$CRIU" ] && ! timeout 60 "$CRIU" check >"$WORK/criu-check.log" 2>&1; then
	log "run.sh: '$CRIU check' failed, so CRIU is left out:"
	tail -5 "$WORK/criu-check.log" | sed 's/^/    /' >&2
	CRIU_NOTE="$CRIU ($("$CRIU" --version 2>&1 | head -1)): not run, 'criu check' failed: $(
		grep -v '^$' "$WORK/criu-check.log" | tail -1)"
	CRIU=""
fi
TOOLS=(torpor)
[ -n "$CRIU" ] && TOOLS+=(criu)
[ "$LAZY" = 1 ] && TOOLS+=(torpor-lazy)

gcc -O2 -o "$WORK/mem" "$BENCH/mem.c" || die "cannot build bench/mem.c"
gcc -O2 -pthread -o "$WORK/scale" "$BENCH/scale.c" || die "cannot build bench/scale.c"

HAVE_REDIS=1
if want redis && ! { command -v redis-server && command -v redis-cli; } >/dev/null; then
	log "redis-server or redis-cli missing (apt-get install redis-server): skipping redis"
	HAVE_REDIS=0
fi

# --- the machine ---------------------------------------------------------------------

{
	echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
	echo "command: bash bench/run.sh ${ARGS[*]}"
	echo "cpus: $(nproc) ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo))"
	echo "memory: $(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
	echo "kernel: $(uname -r)"
	echo "images in: $WORK ($(df -P -T "$WORK" | awk 'NR == 2 { print $2 " on " $1 }'))"
	echo "torpor: $TORPOR ($TORPOR_FROM)"
	[ -n "$DUMP_ARGS" ] && echo "torpor dump arguments: $DUMP_ARGS"
	if [ -n "$CRIU" ]; then
		echo "criu: $CRIU ($("$CRIU" --version 2>&1 | head -1))"
	elif [ -n "$CRIU_NOTE" ]; then
		echo "criu: $CRIU_NOTE"
	else
		echo "criu: none (not on PATH, no --criu)"
	fi
	echo "python: $("$PY" --version 2>&1)"
	[ "$HAVE_REDIS" = 1 ] && want redis && echo "redis: $(redis-server --version | awk '{ print $3 }')"
	echo "reps: $REPS; restore: $([ "$COLD" = 1 ] && echo "cold (image dropped from the page cache)" || echo "warm (image in the page cache, as the dump left it)")"
} >"$META"
sed 's/^/  /' "$META" >&2

printf 'workload\ttool\trep\trss_mib\tstatus\tdump_s\tfrozen_s\timage_bytes\tdump_rss_kib\trestore_s\tanswer_s\tcheck_before_s\tcheck_after_s\trestore_rss_kib\tintact\tnote\tloaded_s\n' >"$RESULTS"
printf 'workload\tbytes\twrite_cache_s\twrite_fsync_s\twrite_direct_s\tread_cache_s\tread_direct_s\n' >"$LIMITS"

# --- the machine's limits ------------------------------------------------------------

# Seconds dd reports for one transfer, or "" if it failed (O_DIRECT on tmpfs, say).
dd_seconds() {
	LC_ALL=C dd "$@" bs=1M 2>&1 >/dev/null |
		awk '/ copied, / { sub(/.* copied, /, ""); sub(/ s,.*/, ""); print }'
}

# Writes and reads BYTES (rounded up to MiB) on the image filesystem, five ways.
measure_limits() {
	local name=$1 bytes=$2 n f="$WORK/dd.bin" wc wf wd rc rd
	n=$(((bytes + 1048575) / 1048576))
	[ "$n" -ge 1 ] || n=1
	sync
	rm -f "$f"
	wd=$(dd_seconds if=/dev/zero of="$f" count="$n" oflag=direct)
	rd=$(dd_seconds if="$f" of=/dev/null iflag=direct)
	rm -f "$f"
	wf=$(dd_seconds if=/dev/zero of="$f" count="$n" conv=fsync)
	# Still in the page cache from the write just made, as an image is after a dump.
	rc=$(dd_seconds if="$f" of=/dev/null)
	rm -f "$f"
	wc=$(dd_seconds if=/dev/zero of="$f" count="$n")
	rm -f "$f"
	sync
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$((n * 1048576))" "${wc:--}" "${wf:--}" \
		"${wd:--}" "${rc:--}" "${rd:--}" >>"$LIMITS"
	log "$(printf '  disk, %s MiB: write %.3f s (page cache), %.3f s (fsync), %.3f s (O_DIRECT);' \
		"$n" "${wc:-0}" "${wf:-0}" "${wd:-0}") $(printf 'read %.3f s (page cache), %.3f s (O_DIRECT)' \
		"${rc:-0}" "${rd:-0}")"
}

# --- starting and checking workloads ---------------------------------------------------

# Each start_* sets PID, STATE (its directory) and PORT (redis), or returns false.

start_mem() {
	local size=$1 flavour=$2
	STATE="$WORK/state-$flavour-$size"
	rm -rf "$STATE" && mkdir -p "$STATE"
	launch "$STATE/out" "$WORK/mem" "$size" "$flavour" "$STATE"
	PID=$LAUNCHED
	if ! wait_file "$STATE/ready" $((60 + size / 32)); then
		log "  mem did not get ready: $(tail -3 "$STATE/out")"
		return 1
	fi
}

start_scale() {
	local maps=$1 threads=$2
	STATE="$WORK/state-scale-$maps-$threads"
	rm -rf "$STATE" && mkdir -p "$STATE"
	launch "$STATE/out" "$WORK/scale" "$maps" "$threads" "$STATE"
	PID=$LAUNCHED
	if ! wait_file "$STATE/ready" 60; then
		log "  scale did not get ready: $(tail -3 "$STATE/out")"
		return 1
	fi
}

start_python() {
	STATE="$WORK/state-python"
	rm -rf "$STATE" && mkdir -p "$STATE"
	launch "$STATE/out" "$PY" "$BENCH/pydict.py" "$DICT_ENTRIES" "$STATE"
	PID=$LAUNCHED
	if ! wait_file "$STATE/ready" 120; then
		log "  pydict.py did not get ready: $(tail -3 "$STATE/out")"
		return 1
	fi
}

redis() { timeout 30 redis-cli -p "$PORT" "$@" 2>/dev/null; }

start_redis() {
	local i loaded
	STATE="$WORK/state-redis"
	rm -rf "$STATE" && mkdir -p "$STATE"
	for _ in 1 2 3 4 5; do
		PORT=$((20000 + RANDOM % 12000))
		# Something answers there already: pick another port.
		(exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && continue
		launch "$STATE/out" redis-server --port "$PORT" --bind 127.0.0.1 --save '' \
			--appendonly no --daemonize no --dir "$STATE" --logfile '' \
			--enable-debug-command local
		PID=$LAUNCHED
		for ((i = 0; i < 500; i++)); do
			[ "$(redis PING)" = PONG ] && break
			[ -e "/proc/$PID" ] || break
			sleep 0.01
		done
		[ "$(redis PING)" = PONG ] && break
		stop_pid "$PID"
		PID=""
	done
	if [ -z "$PID" ]; then
		log "  redis-server did not start: $(tail -3 "$STATE/out")"
		return 1
	fi
	loaded=$(timeout 300 "$PY" "$BENCH/redisgen.py" "$REDIS_KEYS" |
		timeout 300 redis-cli -p "$PORT" --pipe 2>&1 | tail -1)
	if [[ "$loaded" != *"errors: 0, replies: $REDIS_KEYS"* ]]; then
		log "  loading redis failed: $loaded"
		return 1
	fi
	[ "$(redis DBSIZE)" = "$REDIS_KEYS" ] || { log "  redis DBSIZE is not $REDIS_KEYS"; return 1; }
	REDIS_DIGEST=$(redis DEBUG DIGEST)
}

# Asks the process for a full check of its memory; prints "OK <s>" with the time from
# START (an $EPOCHREALTIME) to the answer, and the process's own check time, or "BAD ..."
# or "NONE" when it does not answer.
ask_check() {
	local start=$1 limit=$2 word ms t
	rm -f "$STATE/reply"
	kill -USR1 "$PID" 2>/dev/null || { echo NONE; return; }
	wait_file "$STATE/reply" "$limit" || { echo NONE; return; }
	t=$EPOCHREALTIME
	read -r word ms _ <"$STATE/reply"
	echo "$word $(elapsed "$start" "$t") $(awk -v ms="${ms:-0}" 'BEGIN { printf "%.3f", ms / 1000 }')"
}

# Asks the process for a pong, which needs none of its memory but what it runs on;
# prints the seconds from START, or NONE.
ask_pong() {
	local start=$1 limit=$2 word t
	rm -f "$STATE/reply"
	kill -USR2 "$PID" 2>/dev/null || { echo NONE; return; }
	wait_file "$STATE/reply" "$limit" || { echo NONE; return; }
	t=$EPOCHREALTIME
	read -r word _ <"$STATE/reply"
	[ "$word" = pong ] || { echo NONE; return; }
	elapsed "$start" "$t"
}

# Seconds torpor's lazy page server reports for loading every page (it runs on after
# `restore --detach` returns, writing to the same stderr), or "-".
lazy_loaded() {
	local i line
	for ((i = 0; i < $1 * 100; i++)); do
		line=$(grep -m1 'all pages loaded' "$WORK/restore.err") && break
		grep -q 'lazy restore of pid .* failed' "$WORK/restore.err" && break
		sleep 0.01
	done
	sed -n 's/.* in \([0-9.]*\) ms.*/\1/p' <<<"${line:-}" | awk '{ printf "%.3f", $1 / 1000 }'
}

# Waits for Redis to answer PING; prints the seconds from START, or NONE.
ask_ping() {
	local start=$1 i
	for ((i = 0; i < 6000; i++)); do
		if [ "$(timeout 2 redis-cli -p "$PORT" PING 2>/dev/null)" = PONG ]; then
			elapsed "$start" "$EPOCHREALTIME"
			return
		fi
		[ -e "/proc/$PID" ] || break
		sleep 0.002
	done
	echo NONE
}

# --- one run: start, dump, restore, check ---------------------------------------------

# The rows this run adds to results.tsv; fields not reached stay "-".
run_one() {
	local kind=$1 name=$2 size=$3 flavour=$4 tool=$5 rep=$6
	local img="$WORK/img-$name-$tool" tmo rss status=failed note="" t0 t1 rc line
	local dump_s=- frozen_s=- image=- dump_rss=- restore_s=- answer_s=- intact=-
	local check_before=- check_after=- restore_rss=- r word t_ans t_check loaded_s=-
	PID="" PORT=""
	log "$name, $tool, run $rep"
	case "$kind" in
	mem) start_mem "$size" "$flavour" ;;
	scale) start_scale "$size" "$flavour" ;;
	python) start_python ;;
	redis) start_redis ;;
	esac || {
		[ -n "$PID" ] && stop_pid "$PID"
		printf '%s\t%s\t%s\t-\tfailed\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\tworkload did not start\t-\n' \
			"$name" "$tool" "$rep" >>"$RESULTS"
		return
	}
	rss=$(awk '/^VmRSS:/ { print int($2 / 1024) }' "/proc/$PID/status" 2>/dev/null)
	rss=${rss:-0}
	tmo=$((120 + rss / 16))

	# A check before the dump: the memory is right, and how long the check takes alone.
	if [ "$kind" != redis ]; then
		r=$(ask_check "$EPOCHREALTIME" "$tmo")
		read -r word _ t_check <<<"$r"
		check_before=${t_check:--}
		if [ "$word" != OK ]; then
			note="check before the dump failed: $r"
			stop_pid "$PID"
		fi
	fi

	rm -rf "$img"
	mkdir -p "$img"
	if [ -z "$note" ]; then
		t0=$EPOCHREALTIME
		if [ "$tool" != criu ]; then
			rmdir "$img"
			timeout -k 10 "$tmo" /usr/bin/time -v -o "$WORK/time.dump" \
				"$TORPOR" dump "$PID" -D "$img" $DUMP_ARGS "${DUMP_EXTRA[@]}" >"$WORK/dump.out" 2>"$WORK/dump.err"
		else
			timeout -k 10 "$tmo" /usr/bin/time -v -o "$WORK/time.dump" \
				"$CRIU" dump -t "$PID" -D "$img" --shell-job -o dump.log \
				>"$WORK/dump.out" 2>"$WORK/dump.err"
		fi
		rc=$?
		t1=$EPOCHREALTIME
		if [ "$rc" = 0 ]; then
			dump_s=$(elapsed "$t0" "$t1")
			dump_rss=$(maxrss "$WORK/time.dump")
			image=$(disk_bytes "$img")
			if [ "$tool" != criu ]; then
				line=$(grep -m1 ' saved to ' "$WORK/dump.err")
				frozen_s=$(sed -n 's/.*frozen \([0-9.]*\) ms.*/\1/p' <<<"$line" |
					awk '{ printf "%.3f", $1 / 1000 }')
				log "  $line"
				grep -m1 ' pre-copy: ' "$WORK/dump.err" | sed 's/^/  /' >&2
			else
				frozen_s=$(criu_frozen "$img")
				log "  criu dump: ${dump_s} s, frozen ${frozen_s:-?} s"
			fi
			[ -n "$frozen_s" ] || frozen_s=-
			# The dump ends the process; it is this shell's child, reaped here.
			if ! wait_gone "$PID" 30; then
				note="the process still runs after the dump"
				stop_pid "$PID"
			fi
		else
			note="dump failed (exit $rc)"
			log "  $tool dump failed, exit $rc:"
			tail -5 "$WORK/dump.err" | sed 's/^/    /' >&2
			[ "$tool" = criu ] && tail -15 "$img/dump.log" 2>/dev/null | sed 's/^/    /' >&2
			stop_pid "$PID"
		fi
	fi

	if [ -z "$note" ]; then
		[ "$COLD" = 1 ] && evict "$img"
		[ -n "$STATE" ] && rm -f "$STATE/reply"
		t0=$EPOCHREALTIME
		if [ "$tool" = torpor ]; then
			timeout -k 10 "$tmo" /usr/bin/time -v -o "$WORK/time.restore" \
				"$TORPOR" restore -D "$img" --detach --pidfile "$WORK/pidfile" \
				>"$WORK/restore.out" 2>"$WORK/restore.err"
		elif [ "$tool" = torpor-lazy ]; then
			timeout -k 10 "$tmo" /usr/bin/time -v -o "$WORK/time.restore" \
				"$TORPOR" restore -D "$img" --lazy --detach --pidfile "$WORK/pidfile" \
				>"$WORK/restore.out" 2>"$WORK/restore.err"
		else
			timeout -k 10 "$tmo" /usr/bin/time -v -o "$WORK/time.restore" \
				"$CRIU" restore -D "$img" --shell-job -d -o restore.log \
				>"$WORK/restore.out" 2>"$WORK/restore.err"
		fi
		rc=$?
		t1=$EPOCHREALTIME
		if [ "$rc" = 0 ]; then
			restore_s=$(elapsed "$t0" "$t1")
			restore_rss=$(maxrss "$WORK/time.restore")
			[ "$tool" != criu ] && log "  $(grep -m1 ' woken from ' "$WORK/restore.err")"
			# A lazily restored process answers before its memory is all there: ask
			# for a pong first, then check everything.
			if [ "$tool" = torpor-lazy ] && [ "$kind" != redis ]; then
				answer_s=$(ask_pong "$t0" "$tmo")
				[ "$answer_s" = NONE ] && answer_s=-
			fi
			if [ "$kind" = redis ]; then
				answer_s=$(ask_ping "$t0")
				if [ "$answer_s" = NONE ]; then
					answer_s=- intact=no note="does not answer PING"
				elif [ "$(redis DBSIZE)" = "$REDIS_KEYS" ] &&
					[ "$(redis DEBUG DIGEST)" = "$REDIS_DIGEST" ]; then
					intact=yes
				else
					intact=no note="DBSIZE $(redis DBSIZE), digest differs"
				fi
			else
				r=$(ask_check "$t0" "$tmo")
				read -r word t_ans t_check <<<"$r"
				[ "$tool" = torpor-lazy ] && t_ans=$answer_s
				case "$word" in
				OK) intact=yes answer_s=$t_ans check_after=$t_check ;;
				BAD) intact=no answer_s=$t_ans check_after=$t_check note="memory differs" ;;
				*) intact=no note="no answer to the check" ;;
				esac
			fi
			if [ "$tool" = torpor-lazy ]; then
				loaded_s=$(lazy_loaded "$tmo")
				[ -n "$loaded_s" ] || {
					loaded_s=- intact=no
					note="lazy loading did not finish: $(grep -m1 'failed' "$WORK/restore.err")"
				}
				log "  $(grep -m1 'all pages loaded' "$WORK/restore.err")"
			fi
			log "  restore ${restore_s} s, answers after ${answer_s} s, intact: $intact"
			[ "$intact" = yes ] && status=ok
		else
			note="restore failed (exit $rc)"
			log "  $tool restore failed, exit $rc:"
			tail -5 "$WORK/restore.err" | sed 's/^/    /' >&2
			[ "$tool" = criu ] && tail -15 "$img/restore.log" 2>/dev/null | sed 's/^/    /' >&2
		fi
		[ -n "$PID" ] && stop_pid "$PID"
	fi

	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
		"$name" "$tool" "$rep" "$rss" "$status" "$dump_s" "$frozen_s" "$image" "$dump_rss" \
		"$restore_s" "$answer_s" "$check_before" "$check_after" "$restore_rss" "$intact" \
		"${note:--}" "$loaded_s" >>"$RESULTS"
	[ "$KEEP" = 1 ] || rm -rf "$img"

	# The machine's limits, once per workload, for as many bytes as the first image.
	if [ "$rep" = 1 ] && [ "$tool" = torpor ]; then
		measure_limits "$name" "$([ "$image" != - ] && echo "$image" || echo $((rss * 1048576)))"
	fi
}

# CRIU's frozen time in seconds, from its stats-dump file (needs crit), or "".
criu_frozen() {
	[ -f "$1/stats-dump" ] || return 0
	# stats-dump is two 32-bit magics, a 32-bit length and one protobuf StatsEntry, whose
	# field 1 (DumpStatsEntry) holds frozen_time (field 2, microseconds). Read it directly
	# so that no crit (a Python tool built apart from criu) is needed.
	"$PY" - "$1/stats-dump" <<'PYEOF'
import struct, sys

def varint(b, i):
    v = s = 0
    while True:
        c = b[i]; i += 1
        v |= (c & 0x7f) << s; s += 7
        if c < 0x80:
            return v, i

def fields(b):
    i = 0
    while i < len(b):
        key, i = varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = varint(b, i)
        elif wt == 2:
            n, i = varint(b, i); v = b[i:i + n]; i += n
        elif wt == 5:
            v = b[i:i + 4]; i += 4
        elif wt == 1:
            v = b[i:i + 8]; i += 8
        else:
            return
        yield num, v

try:
    data = open(sys.argv[1], "rb").read()
    (n,) = struct.unpack_from("<I", data, 8)
    dump = dict(fields(data[12:12 + n])).get(1)
    print("%.3f" % (dict(fields(dump))[2] / 1e6))
except Exception:
    pass
PYEOF
}

# Runs a workload (KIND NAME SIZE FLAVOUR) REPS times with each tool, alternating which
# goes first.
run_workload() {
	local rep tool order
	for ((rep = 1; rep <= REPS; rep++)); do
		order=("${TOOLS[@]}")
		if [ $((rep % 2)) = 0 ] && [ "${#TOOLS[@]}" = 2 ]; then order=(criu torpor); fi
		for tool in "${order[@]}"; do
			run_one "$@" "$tool" "$rep"
		done
	done
}

# Whether there is room for a workload of SIZE MiB: memory for it and a margin, disk for
# its image and dd's file.
fits() {
	local size=$1 avail
	avail=$(mem_avail_mib)
	if [ "$avail" -lt $((size * 2 + 1024)) ]; then
		log "skipping $2: $avail MiB of memory available, $((size * 2 + 1024)) MiB wanted"
		return 1
	fi
	avail=$(disk_avail_mib "$WORK")
	if [ "$avail" -lt $((size * 3 + 1024)) ]; then
		log "skipping $2: $avail MiB free on disk, $((size * 3 + 1024)) MiB wanted"
		return 1
	fi
}

# --- the runs ------------------------------------------------------------------------

START=$EPOCHREALTIME
if want mem; then
	for size in "${SIZE_LIST[@]}"; do
		for flavour in "${FLAVOURS[@]}"; do
			if ((size % 1024 == 0)); then
				name="mem-$flavour-$((size / 1024))G"
			else
				name="mem-$flavour-${size}M"
			fi
			fits "$size" "$name" && run_workload mem "$name" "$size" "$flavour"
		done
	done
fi
# A process that keeps writing, dumped as usual and with pre-copy (torpor only: CRIU's
# pre-dump is a different procedure).
if want precopy && fits 1024 mem-dirty-1G; then
	run_workload mem mem-dirty-1G 1024 dirty
	DUMP_EXTRA=(--pre-copy)
	for ((rep = 1; rep <= REPS; rep++)); do
		run_one mem mem-dirty-1G-precopy 1024 dirty torpor "$rep"
	done
	DUMP_EXTRA=()
fi
want python && fits 512 python-dict-2M && run_workload python python-dict-2M 0 -
want redis && [ "$HAVE_REDIS" = 1 ] && fits 512 redis-1M && run_workload redis redis-1M 0 -
if want scale; then
	# For scale workloads SIZE and FLAVOUR are the numbers of mappings and threads.
	run_workload scale maps-10k 10000 0
	run_workload scale threads-1k 10 1000
fi
echo "duration: $(elapsed "$START" "$EPOCHREALTIME") s" >>"$META"

# --- the report ------------------------------------------------------------------------

if [ -z "$OUT" ]; then
	OUT="$BENCH/results-$(date +%F).md"
	[ -e "$OUT" ] && OUT="$BENCH/results-$(date +%F-%H%M%S).md"
fi
"$PY" "$BENCH/report.py" "$META" "$RESULTS" "$LIMITS" >"$WORK/report.md" ||
	die "report.py failed; raw figures in $RESULTS (kept with --keep)"
cp "$WORK/report.md" "$OUT"
echo
cat "$WORK/report.md"
log "written to $OUT"
