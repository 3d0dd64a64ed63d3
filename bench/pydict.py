"""Benchmark workload: a Python process holding a dict of N entries, checked on request.

    python3 pydict.py N STATEDIR

Builds {"key:<i>": value(i)} for i < N, then writes "ready PID BUILD_MS" to
STATEDIR/ready and waits for signals:
    SIGUSR1  check every entry and write "OK MS" or "BAD MS" to STATEDIR/reply
    SIGUSR2  write "pong" to STATEDIR/reply at once
    SIGTERM  exit
Replies are written to a temporary name and renamed, so a reader never sees half a line.
"""

import gc
import os
import signal
import sys
import time


def value(i):
    # Large enough to be a separate int object each, not one of the cached small ints.
    return (i * 2654435761) % 4294967291 + 1000


def reply(statedir, name, text):
    tmp = os.path.join(statedir, "." + name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, os.path.join(statedir, name))


def check(d, n):
    if len(d) != n:
        return False
    return all(d.get("key:%d" % i) == value(i) for i in range(n))


def main():
    n, statedir = int(sys.argv[1]), sys.argv[2]
    requests = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM}
    # Blocked first, so that no request is lost while the dict is built.
    signal.pthread_sigmask(signal.SIG_BLOCK, requests)

    t0 = time.monotonic()
    gc.disable()
    d = {"key:%d" % i: value(i) for i in range(n)}
    gc.freeze()
    reply(statedir, "ready", "ready %d %.0f\n" % (os.getpid(), (time.monotonic() - t0) * 1e3))

    while True:
        sig = signal.sigwait(requests)
        if sig == signal.SIGTERM:
            return
        if sig == signal.SIGUSR2:
            reply(statedir, "reply", "pong\n")
            continue
        t0 = time.monotonic()
        ok = check(d, n)
        ms = (time.monotonic() - t0) * 1e3
        reply(statedir, "reply", "%s %.0f\n" % ("OK" if ok else "BAD", ms))


if __name__ == "__main__":
    main()
