/*
 * Benchmark workload: holds SIZE MiB of anonymous memory of one flavour and checks it on
 * request.
 *
 *   mem SIZE_MIB FLAVOUR STATEDIR
 *
 * FLAVOUR is one of
 *   random    every byte from a PRNG: nothing to compress, no zero page
 *   halfzero  every other 4 KiB page written with zeros, the rest random
 *   text      words from a small vocabulary, in lines: compresses like prose
 *   dirty     like random, and it keeps writing: every 10 ms it rewrites DIRTY_PAGES
 *             pages picked at random (4 MiB/s), each with the next version of its
 *             content, for dumps made while it runs (--pre-copy)
 *
 * Once the memory is filled it writes "ready PID FILL_MS" to STATEDIR/ready. Then it waits
 * for signals:
 *   SIGUSR1  recompute the checksum of the whole area and write "OK MS" or "BAD MS" to
 *            STATEDIR/reply (MS: how long the check took)
 *   SIGUSR2  write "pong" to STATEDIR/reply at once
 *   SIGTERM  exit
 * Replies are written to a temporary name and renamed, so a reader never sees half a line.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
/* Pages rewritten per 10 ms by the dirty flavour: 4 MiB/s. */
#define DIRTY_PAGES 10

static const char *statedir;

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* splitmix64: fast, and its output does not compress. */
static uint64_t next(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static void fill_random(uint64_t *p, size_t words, uint64_t *seed)
{
	for (size_t i = 0; i < words; i++)
		p[i] = next(seed);
}

/* 64 words, so that six bits of a random number pick one. */
static const char *const vocabulary[64] = {
	"the", "of", "and", "a", "to", "in", "is", "you", "that", "it", "he", "was", "for",
	"on", "are", "as", "with", "his", "they", "at", "be", "this", "have", "from", "or",
	"one", "had", "by", "word", "but", "not", "what", "all", "were", "we", "when", "your",
	"can", "said", "there", "use", "an", "each", "which", "she", "do", "how", "their",
	"if", "will", "up", "other", "about", "out", "many", "then", "them", "these", "so",
	"some", "process", "memory", "restore", "kernel",
};

static void fill_text(char *p, size_t len, uint64_t *seed)
{
	size_t lens[64], i = 0, col = 0;

	for (int k = 0; k < 64; k++)
		lens[k] = strlen(vocabulary[k]);
	while (i + 16 < len) {
		uint64_t r = next(seed);

		for (int k = 0; k < 10 && i + 16 < len; k++, r >>= 6) {
			size_t w = r & 63;

			memcpy(p + i, vocabulary[w], lens[w]);
			i += lens[w];
			col += lens[w] + 1;
			p[i++] = col > 72 ? '\n' : ' ';
			if (col > 72)
				col = 0;
		}
	}
	while (i < len)
		p[i++] = '\n';
}

/* Four independent multiply-xor lanes, so the check runs at memory speed. */
static uint64_t checksum(const uint64_t *p, size_t words)
{
	uint64_t h[4] = { 1, 2, 3, 4 };
	const uint64_t m = 0x100000001b3ULL;
	size_t i = 0;

	for (; i + 4 <= words; i += 4) {
		h[0] = (h[0] ^ p[i]) * m;
		h[1] = (h[1] ^ p[i + 1]) * m;
		h[2] = (h[2] ^ p[i + 2]) * m;
		h[3] = (h[3] ^ p[i + 3]) * m;
	}
	for (; i < words; i++)
		h[0] = (h[0] ^ p[i]) * m;
	return h[0] ^ (h[1] << 1) ^ (h[2] << 2) ^ (h[3] << 3);
}

/* Content of page `page`, version `v`, for the dirty flavour. */
static void fill_version(uint64_t *p, size_t page, uint32_t v)
{
	uint64_t seed = ((uint64_t)page << 32) ^ v ^ 0x6469727479ULL;

	fill_random(p, PAGE / 8, &seed);
}

/* Whether every page holds the content of its version. */
static int check_versions(const char *mem, const uint32_t *versions, size_t pages)
{
	uint64_t want[PAGE / 8];

	for (size_t i = 0; i < pages; i++) {
		fill_version(want, i, versions[i]);
		if (memcmp(want, mem + i * PAGE, PAGE) != 0)
			return 0;
	}
	return 1;
}

static void reply(const char *name, const char *text)
{
	char tmp[4096], path[4096];
	FILE *f;

	snprintf(tmp, sizeof(tmp), "%s/.%s.tmp", statedir, name);
	snprintf(path, sizeof(path), "%s/%s", statedir, name);
	f = fopen(tmp, "w");
	if (!f) {
		perror(tmp);
		exit(1);
	}
	fputs(text, f);
	if (fclose(f) != 0 || rename(tmp, path) != 0) {
		perror(path);
		exit(1);
	}
}

int main(int argc, char **argv)
{
	char line[128];
	uint64_t seed = 0x746f72706f72ULL, expected;
	size_t size, words;
	sigset_t set;
	double t0;
	char *mem;
	uint32_t *versions = NULL;
	uint64_t pick = 0x9e3779b97f4a7c15ULL;
	int dirty = 0;

	if (argc != 4) {
		fprintf(stderr, "usage: %s SIZE_MIB random|halfzero|text|dirty STATEDIR\n", argv[0]);
		return 2;
	}
	size = (size_t)strtoull(argv[1], NULL, 10) << 20;
	statedir = argv[3];
	if (size == 0) {
		fprintf(stderr, "mem: size must be at least 1 MiB\n");
		return 2;
	}
	words = size / 8;

	/* Block the request signals before anything else, so none is lost while filling. */
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, SIGUSR2);
	sigaddset(&set, SIGTERM);
	sigprocmask(SIG_BLOCK, &set, NULL);

	mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("mmap");
		return 1;
	}

	t0 = now_ms();
	if (strcmp(argv[2], "random") == 0) {
		fill_random((uint64_t *)mem, words, &seed);
	} else if (strcmp(argv[2], "halfzero") == 0) {
		for (size_t off = 0; off < size; off += PAGE) {
			/* Written zeros: the page is present (not the shared zero page). */
			if ((off / PAGE) % 2)
				memset(mem + off, 0, PAGE);
			else
				fill_random((uint64_t *)(mem + off), PAGE / 8, &seed);
		}
	} else if (strcmp(argv[2], "text") == 0) {
		fill_text(mem, size, &seed);
	} else if (strcmp(argv[2], "dirty") == 0) {
		dirty = 1;
		versions = calloc(size / PAGE, sizeof(*versions));
		if (!versions) {
			perror("calloc");
			return 1;
		}
		for (size_t i = 0; i < size / PAGE; i++)
			fill_version((uint64_t *)(mem + i * PAGE), i, 0);
	} else {
		fprintf(stderr, "mem: unknown flavour %s\n", argv[2]);
		return 2;
	}
	expected = checksum((const uint64_t *)mem, words);
	snprintf(line, sizeof(line), "ready %d %.0f\n", (int)getpid(), now_ms() - t0);
	reply("ready", line);

	for (;;) {
		/* The dirty flavour writes between signals, every 10 ms. */
		struct timespec tick = { 0, 10 * 1000 * 1000 };
		int sig = dirty ? sigtimedwait(&set, NULL, &tick) : sigwaitinfo(&set, NULL);

		if (sig < 0 && dirty && errno == EAGAIN) {
			for (int k = 0; k < DIRTY_PAGES; k++) {
				size_t i;

				pick ^= pick << 13;
				pick ^= pick >> 7;
				pick ^= pick << 17;
				i = pick % (size / PAGE);
				fill_version((uint64_t *)(mem + i * PAGE), i, ++versions[i]);
			}
			continue;
		}
		if (sig < 0) {
			if (errno == EINTR)
				continue;
			perror("sigwait");
			return 1;
		}
		if (sig == SIGTERM)
			return 0;
		if (sig == SIGUSR2) {
			reply("reply", "pong\n");
			continue;
		}
		t0 = now_ms();
		int ok = dirty ? check_versions(mem, versions, size / PAGE)
			       : checksum((const uint64_t *)mem, words) == expected;
		snprintf(line, sizeof(line), "%s %.0f\n", ok ? "OK" : "BAD", now_ms() - t0);
		reply("reply", line);
	}
}
