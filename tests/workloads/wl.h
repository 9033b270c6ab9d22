/*
 * wl.h - the protocol every C workload speaks with the test harness
 * (tests/workloads/workloads.py), header-only so each workload stays one .c file.
 *
 *   workload DIR
 *     set up state -> DIR/ready ("pid=N" + key=value lines), "READY" on stdout
 *     wait (10 ms naps) until DIR/go exists        <- checkpoint/restore happens here
 *     verify -> DIR/result "PASS" or "FAIL: reason" lines, same on stdout, exit 0/1
 *
 * Why no stdio and no malloc here: memory.c checks that the program break did
 * not move, and regs.c keeps values in caller-saved registers; the protocol must
 * not allocate or call into anything heavier than a raw write. Files are written
 * to NAME.tmp and renamed, so a reader never sees half a file.
 *
 * WL_SABOTAGE=1 in the environment asks a workload to break one piece of its own
 * state after go and before verifying, to prove that its checks can fail.
 */
#ifndef WL_H
#define WL_H

#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define WL_NAP_NS 10000000L /* 10 ms: the harness's polling grain; cheap when idle */

static char wl_dir[PATH_MAX];   /* absolute: files.c changes its cwd */
static int wl_dirfd = -1;       /* set by wl_hold_dir(): protocol I/O relative to it */
static char wl_failures[16384];
static size_t wl_failures_len;
static int wl_nfail;
static int wl_sabotage;

static inline const char *wl_path(const char *name, char *buf, size_t size)
{
	if (wl_dirfd >= 0)
		return name;
	snprintf(buf, size, "%s/%s", wl_dir, name);
	return buf;
}

static inline int wl_base(void)
{
	return wl_dirfd >= 0 ? wl_dirfd : AT_FDCWD;
}

/* Write all of buf to fd, riding out EINTR (timers.c has signals firing). */
static inline int wl_write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

static inline void wl_say(const char *text)
{
	wl_write_all(STDOUT_FILENO, text, strlen(text));
}

/* Atomically create DIR/name with the given text. */
static inline int wl_write_file(const char *name, const char *text)
{
	char tmpname[64], p1[PATH_MAX + 64], p2[PATH_MAX + 64];
	snprintf(tmpname, sizeof(tmpname), "%s.tmp", name);
	const char *tmp = wl_path(tmpname, p1, sizeof(p1));
	int fd = openat(wl_base(), tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return -1;
	int rc = wl_write_all(fd, text, strlen(text));
	close(fd);
	if (rc == 0)
		rc = renameat(wl_base(), tmp, wl_base(), wl_path(name, p2, sizeof(p2)));
	return rc;
}

/* Setup failed before ready: report it the same way a verdict is reported. */
__attribute__((noreturn, format(printf, 1, 2)))
static inline void wl_die(const char *fmt, ...)
{
	char msg[1024], text[1100];
	va_list ap;
	int saved = errno;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	snprintf(text, sizeof(text), "FAIL: setup: %s (errno %d: %s)\n", msg, saved, strerror(saved));
	wl_write_file("result", text);
	wl_say(text);
	_exit(1);
}

/* Record one failed check; verification goes on so that all reasons are reported. */
__attribute__((format(printf, 1, 2)))
static inline void wl_fail(const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	wl_nfail++;
	int n = snprintf(wl_failures + wl_failures_len, sizeof(wl_failures) - wl_failures_len,
			 "FAIL: %s\n", msg);
	if (n > 0 && wl_failures_len + (size_t)n < sizeof(wl_failures))
		wl_failures_len += (size_t)n;
}

/* CHECK(cond, "what, with %d", args): fail with the message when cond is false. */
#define CHECK(cond, ...) do { if (!(cond)) wl_fail(__VA_ARGS__); } while (0)
/* CHECK_EQ for integers: prints both values. */
#define CHECK_EQ(what, got, want) do { \
	long long wl_g_ = (long long)(got), wl_w_ = (long long)(want); \
	if (wl_g_ != wl_w_) wl_fail("%s: got %lld (%#llx), want %lld (%#llx)", (what), \
				    wl_g_, (unsigned long long)wl_g_, wl_w_, (unsigned long long)wl_w_); \
} while (0)
/* CHECK_SYS(expr): expr must not return -1. */
#define CHECK_SYS(expr) do { if ((long)(expr) == -1) wl_fail("%s: %s", #expr, strerror(errno)); } while (0)
/* SETUP(expr): expr must not return -1, or the workload dies before ready. */
#define SETUP(expr) do { if ((long)(expr) == -1) wl_die("%s", #expr); } while (0)

static inline void wl_init(int argc, char **argv)
{
	if (argc < 2) {
		static const char usage[] = "usage: workload DIR\n";
		wl_write_all(STDERR_FILENO, usage, sizeof(usage) - 1);
		_exit(2);
	}
	if (!realpath(argv[1], wl_dir)) {
		perror(argv[1]);
		_exit(2);
	}
	const char *s = getenv("WL_SABOTAGE");
	wl_sabotage = s && *s && strcmp(s, "0") != 0;
}

/* Keep a descriptor of DIR for the protocol files, for a workload that gives
 * up the right to reach DIR by its path (limits_creds drops to uid 1000). */
static inline void wl_hold_dir(void)
{
	wl_dirfd = open(wl_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (wl_dirfd < 0)
		wl_die("open %s", wl_dir);
}

/* Write DIR/ready.tmp: "pid=N" then the caller's key=value lines. */
__attribute__((format(printf, 1, 2)))
static inline void wl_prepare_ready(const char *fmt, ...)
{
	char text[4096], p[PATH_MAX + 64];
	int n = snprintf(text, sizeof(text), "pid=%d\n", (int)getpid());
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(text + n, sizeof(text) - (size_t)n, fmt, ap);
	va_end(ap);
	int fd = openat(wl_base(), wl_path("ready.tmp", p, sizeof(p)),
			O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0 || wl_write_all(fd, text, strlen(text)) < 0)
		wl_die("write ready.tmp");
	close(fd);
}

/* Say READY, then publish DIR/ready (rename of ready.tmp). In that order: a
 * waiter that sees DIR/ready must find the output offsets already still. */
static inline void wl_commit_ready(void)
{
	char p1[PATH_MAX + 64], p2[PATH_MAX + 64];
	wl_say("READY\n");
	if (renameat(wl_base(), wl_path("ready.tmp", p1, sizeof(p1)),
		     wl_base(), wl_path("ready", p2, sizeof(p2))) < 0)
		wl_die("rename ready.tmp");
}

#define wl_ready(...) do { wl_prepare_ready(__VA_ARGS__); wl_commit_ready(); } while (0)

static inline int wl_go_exists(void)
{
	char p[PATH_MAX + 64];
	return faccessat(wl_base(), wl_path("go", p, sizeof(p)), F_OK, 0) == 0;
}

/* One nap of the wait loop. A signal may cut it short, which is fine. */
static inline void wl_nap(void)
{
	struct timespec ts = { 0, WL_NAP_NS };
	nanosleep(&ts, NULL);
}

/* Wait for DIR/go, calling tick (if any) between naps so that a workload keeps
 * doing what it does while it waits. */
static inline void wl_wait_go(void (*tick)(void))
{
	while (!wl_go_exists()) {
		if (tick)
			tick();
		wl_nap();
	}
}

/* Write the verdict and return the exit status for main. */
static inline int wl_finish(void)
{
	const char *verdict = wl_nfail ? wl_failures : "PASS\n";
	if (wl_write_file("result", verdict) < 0) {
		char msg[128];
		snprintf(msg, sizeof(msg), "FAIL: cannot write result: %s\n", strerror(errno));
		wl_say(msg);
		return 1;
	}
	wl_say(verdict);
	return wl_nfail ? 1 : 0;
}

/* Read a whole (small, /proc) file into buf without malloc; returns its length or -1. */
static inline ssize_t wl_read_file(const char *path, char *buf, size_t size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	size_t len = 0;
	while (len + 1 < size) {
		ssize_t n = read(fd, buf + len, size - 1 - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += (size_t)n;
	}
	close(fd);
	buf[len] = '\0';
	return (ssize_t)len;
}

/* Copy the value of "Field:" in /proc/self/status text (trimmed) into out. */
static inline int wl_status_field(const char *status, const char *field, char *out, size_t size)
{
	size_t flen = strlen(field);
	for (const char *line = status; line && *line; line = strchr(line, '\n')) {
		if (*line == '\n')
			line++;
		if (strncmp(line, field, flen) == 0 && line[flen] == ':') {
			const char *v = line + flen + 1;
			while (*v == ' ' || *v == '\t')
				v++;
			size_t n = strcspn(v, "\n");
			if (n >= size)
				n = size - 1;
			memcpy(out, v, n);
			out[n] = '\0';
			return 0;
		}
	}
	out[0] = '\0';
	return -1;
}

/* xorshift64: a fast, seedable pattern for memory that must survive intact. */
static inline uint64_t wl_xorshift(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

/* Trees whose members report to DIR: "P.PID" files, written whole (through
 * a .tmp name). How many with this prefix there are now. */
static inline int wl_count_reports(char prefix)
{
	int n = 0;
	DIR *d = opendir(wl_dir);
	struct dirent *e;
	if (!d)
		return -1;
	while ((e = readdir(d)) != NULL)
		if (e->d_name[0] == prefix && e->d_name[1] == '.' && !strstr(e->d_name, ".tmp"))
			n++;
	closedir(d);
	return n;
}

/* After go: wait (at most naps) for the members' "r.PID" verdicts, then fail
 * for each that is missing or not PASS. */
static inline void wl_check_member_reports(int expected, int naps)
{
	while (wl_count_reports('r') < expected && naps-- > 0)
		wl_nap();
	if (wl_count_reports('r') != expected)
		wl_fail("processes that checked themselves: %d, want %d", wl_count_reports('r'),
			expected);
	DIR *d = opendir(wl_dir);
	struct dirent *e;
	while (d && (e = readdir(d)) != NULL) {
		char path[PATH_MAX + 64], buf[4096];
		if (e->d_name[0] != 'r' || e->d_name[1] != '.' || strstr(e->d_name, ".tmp"))
			continue;
		snprintf(path, sizeof(path), "%s/%s", wl_dir, e->d_name);
		ssize_t n = wl_read_file(path, buf, sizeof(buf));
		if (n < 0 || strncmp(buf, "PASS", 4) != 0)
			wl_fail("pid %s: %s", e->d_name + 2, n < 0 ? "unreadable" : buf);
	}
	if (d)
		closedir(d);
}

#endif /* WL_H */
