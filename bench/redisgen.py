"""Writes N Redis SET commands in the Redis protocol to stdout, for `redis-cli --pipe`.

    python3 redisgen.py N [VALUE_BYTES]

Keys are "key:<i>"; values are VALUE_BYTES hex characters from a seeded PRNG, so they
neither repeat nor compress much, and two runs load the same data.
"""

import random
import sys


def main():
    n = int(sys.argv[1])
    value_bytes = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    rng = random.Random(20261203)
    out = sys.stdout.buffer
    chunk = []
    for i in range(n):
        key = b"key:%d" % i
        val = rng.randbytes(value_bytes // 2).hex().encode()
        chunk.append(
            b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(val), val)
        )
        if len(chunk) == 10000:
            out.write(b"".join(chunk))
            chunk.clear()
    out.write(b"".join(chunk))
    out.flush()


if __name__ == "__main__":
    main()
