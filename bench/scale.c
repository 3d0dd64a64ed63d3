/*
 * Benchmark workload: many mappings or many threads, for costs that grow with their number.
 *
 *   scale MAPPINGS THREADS STATEDIR
 *
 * Makes MAPPINGS separate two-page anonymous mappings (neighbours differ in protection, so
 * the kernel cannot merge them), each page holding its own pattern, and THREADS threads
 * that wait on a condition variable, each knowing its number in thread-local storage.
 * Then the same protocol as mem.c: "ready PID 0" in STATEDIR/ready, and on SIGUSR1 it
 * checks every mapping, wakes every thread to report its number, and writes "OK MS" or
 * "BAD MS" to STATEDIR/reply; SIGTERM ends it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

static const char *statedir;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER, done = PTHREAD_COND_INITIALIZER;
static unsigned long round_no, answered, wrong;
static __thread long my_number = -1;

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void reply(const char *name, const char *text)
{
	char tmp[4096], path[4096];
	FILE *f;

	snprintf(tmp, sizeof(tmp), "%s/.%s.tmp", statedir, name);
	snprintf(path, sizeof(path), "%s/%s", statedir, name);
	f = fopen(tmp, "w");
	if (!f || fputs(text, f) < 0 || fclose(f) != 0 || rename(tmp, path) != 0) {
		perror(path);
		exit(1);
	}
}

static void *worker(void *arg)
{
	unsigned long seen = 0;

	my_number = (long)(intptr_t)arg;
	pthread_mutex_lock(&lock);
	for (;;) {
		while (round_no == seen)
			pthread_cond_wait(&wake, &lock);
		seen = round_no;
		if (my_number != (long)(intptr_t)arg)
			wrong++;
		answered++;
		pthread_cond_signal(&done);
	}
	return NULL;
}

static uint64_t pattern(size_t map, size_t page, size_t word)
{
	return (map * 2 + page) * 0x9e3779b97f4a7c15ULL ^ word;
}

int main(int argc, char **argv)
{
	size_t nmaps, nthreads;
	uint64_t **maps;
	sigset_t set;
	char line[128];

	if (argc != 4) {
		fprintf(stderr, "usage: %s MAPPINGS THREADS STATEDIR\n", argv[0]);
		return 2;
	}
	nmaps = strtoul(argv[1], NULL, 10);
	nthreads = strtoul(argv[2], NULL, 10);
	statedir = argv[3];

	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, SIGUSR2);
	sigaddset(&set, SIGTERM);
	sigprocmask(SIG_BLOCK, &set, NULL);

	maps = calloc(nmaps ? nmaps : 1, sizeof(*maps));
	for (size_t m = 0; m < nmaps; m++) {
		int prot = PROT_READ | PROT_WRITE | (m % 2 ? PROT_EXEC : 0);

		maps[m] = mmap(NULL, 2 * PAGE, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (maps[m] == MAP_FAILED) {
			perror("mmap");
			return 1;
		}
		for (size_t w = 0; w < 2 * PAGE / 8; w++)
			maps[m][w] = pattern(m, w / (PAGE / 8), w);
	}
	for (size_t t = 0; t < nthreads; t++) {
		pthread_attr_t attr;
		pthread_t th;

		pthread_attr_init(&attr);
		pthread_attr_setstacksize(&attr, 64 << 10);
		if (pthread_create(&th, &attr, worker, (void *)(intptr_t)t) != 0) {
			fprintf(stderr, "scale: cannot create thread %zu\n", t);
			return 1;
		}
	}
	snprintf(line, sizeof(line), "ready %d 0\n", (int)getpid());
	reply("ready", line);

	for (;;) {
		int sig = sigwaitinfo(&set, NULL);
		double t0 = now_ms();
		size_t bad = 0;

		if (sig < 0 && errno == EINTR)
			continue;
		if (sig < 0 || sig == SIGTERM)
			return sig < 0;
		if (sig == SIGUSR2) {
			reply("reply", "pong\n");
			continue;
		}
		for (size_t m = 0; m < nmaps; m++)
			for (size_t w = 0; w < 2 * PAGE / 8; w++)
				bad += maps[m][w] != pattern(m, w / (PAGE / 8), w);
		pthread_mutex_lock(&lock);
		answered = wrong = 0;
		round_no++;
		pthread_cond_broadcast(&wake);
		while (answered < nthreads)
			pthread_cond_wait(&done, &lock);
		bad += wrong;
		pthread_mutex_unlock(&lock);
		snprintf(line, sizeof(line), "%s %.3f\n", bad ? "BAD" : "OK", now_ms() - t0);
		reply("reply", line);
	}
}
