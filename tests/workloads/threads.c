/*
 * threads.c - 16 threads of one process survive checkpoint/restore, each with
 * its own state, several of them blocked in different system calls.
 *
 * Thread i (0..15) keeps a counter twice, in a __thread variable (fs base/TLS)
 * and in slot i of a shared array, and has its own:
 *   - blocked mask {SIGRTMIN+i} (+ SIGUSR1 for thread PENDER): all distinct
 *   - sigaltstack (its own 64 KiB area)
 *   - name (pthread_setname_np "wl-tNN", /proc/self/task/TID/comm)
 *   - MXCSR control bits (rounding mode, FTZ, DAZ): its FPU state
 *   - rseq registration by glibc (thread pointer + __rseq_offset) and robust
 *     list (glibc's, in its struct pthread)
 * and spends its time in one kind of call (by i % KINDS):
 *   spin      an asm loop holding a per-thread pattern in xmm15, then a nap
 *   nanosleep relative sleeps (ERESTART_RESTARTBLOCK when interrupted)
 *   condwait  pthread_cond_wait, woken only after go (futex, ERESTARTSYS)
 *   futex     raw FUTEX_WAIT on a word set only after go (ERESTARTSYS)
 *   poll      poll(NULL, 0, 7 ms) (restart block)
 *   timedwait pthread_cond_timedwait, absolute 5 ms deadlines (FUTEX_WAIT_BITSET)
 *   absnano   clock_nanosleep TIMER_ABSTIME (ERESTARTNOHAND)
 * Thread PENDER also has a private pending SIGUSR1 (pthread_kill by main while
 * blocked in that thread).
 *
 * Checked after go, in each thread: gettid() is the tid written at ready; TLS
 * counter == its slot, and both keep going up after go; the blocked mask,
 * MXCSR and the altstack are its own; rseq(area, len, sig) answers EBUSY (same
 * registration) and the kernel still writes cpu_id; get_robust_list is what
 * it was at ready; comm is its own; no blocking call ever returned early
 * (EINTR, or a futex wait woken before go: an interrupted wait must be
 * re-issued, not lost); spin threads still hold their xmm15 pattern. PENDER
 * still has SIGUSR1 pending privately (SigPnd, not ShdPnd), with SI_TKILL
 * (SI_USER on newer kernels) from our pid. Main: /proc/self/task lists exactly the tids of ready; every
 * thread is joined (pthread_join needs the kernel's clear-child-tid).
 */
#include "wl.h"

#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/rseq.h>
#include <dirent.h>

#define NTHREADS 16
#define PENDER 12
#define ALTSTACK_SIZE (64 * 1024)
#define SPIN_LOOPS 5000     /* ~0.2 ms of asm, then a 2 ms nap: three spinners on two cores */
#define AFTER_GO 3      /* iterations each thread does after go */

enum kind { SPIN, NANO, CONDWAIT, FUTEX, POLL, TIMEDWAIT, ABSNANO, KINDS };
static const char *kind_names[] = { "spin", "nanosleep", "condwait", "futex", "poll",
				    "timedwait", "absnano" };

static pthread_t threads[NTHREADS];
static volatile long slots[NTHREADS];
static volatile pid_t tids[NTHREADS];
static volatile int set_up[NTHREADS];
static volatile int go_flag;
static volatile uint32_t futex_word;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t fail_mu = PTHREAD_MUTEX_INITIALIZER;
static char altstacks[NTHREADS][ALTSTACK_SIZE] __attribute__((aligned(64)));
static __thread long tls_count;

#define TFAIL(...) do { pthread_mutex_lock(&fail_mu); wl_fail(__VA_ARGS__); \
			pthread_mutex_unlock(&fail_mu); } while (0)
#define TCHECK(cond, ...) do { if (!(cond)) TFAIL(__VA_ARGS__); } while (0)

static enum kind kind_of(int i) { return (enum kind)(i % KINDS); }

static uint64_t mask_of(int i)
{
	uint64_t m = 1ULL << (SIGRTMIN + i - 1);
	if (i == PENDER)
		m |= 1ULL << (SIGUSR1 - 1);
	return m;
}

static uint64_t current_mask(void)
{
	sigset_t cur;
	uint64_t raw = 0;
	sigemptyset(&cur);
	pthread_sigmask(SIG_BLOCK, NULL, &cur);
	memcpy(&raw, &cur, sizeof(raw));
	return raw;
}

static void count(int i)
{
	tls_count++;
	slots[i]++;
}

/* xmm15 holds a pattern of the thread's own through a stretch of pure asm:
 * returns 1 if it was still there at the end. */
static int spin_with_xmm15(uint64_t pattern)
{
	uint64_t lo = pattern, hi = ~pattern;
	uint32_t same;
	long n = SPIN_LOOPS;
	__asm__ volatile(
		"movq %[lo], %%xmm15\n"
		"pinsrq $1, %[hi], %%xmm15\n"
		"1: pause\n"
		"dec %[n]\n"
		"jnz 1b\n"
		"movq %[lo], %%xmm14\n"
		"pinsrq $1, %[hi], %%xmm14\n"
		"pcmpeqb %%xmm15, %%xmm14\n"
		"pmovmskb %%xmm14, %[same]\n"
		: [same] "=r"(same), [n] "+r"(n)
		: [lo] "r"(lo), [hi] "r"(hi)
		: "xmm14", "xmm15", "cc");
	return same == 0xFFFF;
}

/* MXCSR control bits of the thread's own (rounding, FTZ, DAZ): callee-saved
 * by the ABI, so no library call changes them; the status flags may. */
static uint32_t mxcsr_of(int i)
{
	return 0x1f80 | (uint32_t)(i & 3) << 13 | (i & 4 ? 0x8000 : 0) | (i & 8 ? 0x40 : 0);
}

static uint32_t mxcsr_now(void)
{
	uint32_t v;
	__asm__ volatile("stmxcsr %0" : "=m"(v));
	return v & ~0x3fu;
}

static long futex(volatile uint32_t *addr, int op, uint32_t val)
{
	return syscall(SYS_futex, addr, op, val, NULL, NULL, 0);
}

static void timespec_add_ms(struct timespec *t, long ms)
{
	t->tv_nsec += ms * 1000000L;
	while (t->tv_nsec >= 1000000000L) {
		t->tv_nsec -= 1000000000L;
		t->tv_sec++;
	}
}

/* One round of the thread's kind of waiting; returns 0, or what went wrong. */
static const char *wait_once(int i, uint64_t pattern)
{
	static __thread char why[128];
	switch (kind_of(i)) {
	case SPIN: {
		struct timespec ts = { 0, 2000000 };
		if (!spin_with_xmm15(pattern))
			return "xmm15 lost its pattern";
		if (nanosleep(&ts, NULL) < 0)
			return "nanosleep returned early (EINTR)";
		return NULL;
	}
	case NANO: {
		struct timespec ts = { 0, 3000000 };
		if (nanosleep(&ts, NULL) < 0)
			return "nanosleep returned early (EINTR)";
		return NULL;
	}
	case CONDWAIT:
		pthread_mutex_lock(&mu);
		while (!go_flag)
			pthread_cond_wait(&cv, &mu);
		pthread_mutex_unlock(&mu);
		return NULL;
	case FUTEX:
		while (!go_flag) {
			long rc = futex(&futex_word, FUTEX_WAIT_PRIVATE, 0);
			if (!go_flag && futex_word == 0) {
				snprintf(why, sizeof(why), "futex wait returned %ld (errno %d) before go: "
					 "the wait was lost", rc, rc < 0 ? errno : 0);
				return why;
			}
		}
		return NULL;
	case POLL:
		if (poll(NULL, 0, 7) < 0)
			return "poll returned early (EINTR)";
		return NULL;
	case TIMEDWAIT: {
		struct timespec dl;
		clock_gettime(CLOCK_REALTIME, &dl);
		timespec_add_ms(&dl, 5);
		pthread_mutex_lock(&mu);
		int rc = 0;
		while (!go_flag && rc == 0)
			rc = pthread_cond_timedwait(&cv, &mu, &dl);
		pthread_mutex_unlock(&mu);
		if (rc != 0 && rc != ETIMEDOUT)
			return "pthread_cond_timedwait failed";
		return NULL;
	}
	case ABSNANO: {
		struct timespec dl;
		clock_gettime(CLOCK_MONOTONIC, &dl);
		timespec_add_ms(&dl, 4);
		int rc = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &dl, NULL);
		if (rc != 0)
			return "clock_nanosleep returned early";
		return NULL;
	}
	default:
		return "no such kind";
	}
}

static struct rseq *rseq_area(void)
{
	return (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
}

/* Only the registered length answers EBUSY (another gives EINVAL). */
static uint32_t registered_len(struct rseq *area)
{
	const uint32_t candidates[] = { __rseq_size, sizeof(struct rseq), 32 };
	for (size_t k = 0; k < sizeof(candidates) / sizeof(candidates[0]); k++)
		if (candidates[k] && syscall(SYS_rseq, area, candidates[k], 0, RSEQ_SIG) < 0 &&
		    errno == EBUSY)
			return candidates[k];
	return 0;
}

static void check_comm(int i, pid_t tid)
{
	char path[64], comm[64], want[16];
	snprintf(path, sizeof(path), "/proc/self/task/%d/comm", (int)tid);
	snprintf(want, sizeof(want), "wl-t%02d", i);
	if (wl_read_file(path, comm, sizeof(comm)) < 0) {
		TFAIL("thread %d: cannot read %s", i, path);
		return;
	}
	comm[strcspn(comm, "\n")] = '\0';
	TCHECK(strcmp(comm, want) == 0, "thread %d: comm %s, want %s", i, comm, want);
}

static void check_pending(int i, pid_t tid)
{
	char path[64], status[4096], pnd[32], shd[32];
	snprintf(path, sizeof(path), "/proc/self/task/%d/status", (int)tid);
	wl_read_file(path, status, sizeof(status));
	wl_status_field(status, "SigPnd", pnd, sizeof(pnd));
	wl_status_field(status, "ShdPnd", shd, sizeof(shd));
	uint64_t p = strtoull(pnd, NULL, 16), s = strtoull(shd, NULL, 16);
	uint64_t bit = 1ULL << (SIGUSR1 - 1);
	TCHECK(p & bit, "thread %d: SIGUSR1 not pending privately (SigPnd %s)", i, pnd);
	TCHECK(!(s & bit), "thread %d: SIGUSR1 pending for the process (ShdPnd %s)", i, shd);
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	siginfo_t si;
	struct timespec zero = { 0, 0 };
	int sig = sigtimedwait(&set, &si, &zero);
	TCHECK(sig == SIGUSR1, "thread %d: sigtimedwait gave %d (errno %d), want SIGUSR1", i, sig, errno);
	if (sig == SIGUSR1)
		/* tgkill: SI_TKILL, or SI_USER on newer kernels (as in signals.c) */
		TCHECK((si.si_code == SI_TKILL || si.si_code == SI_USER) && si.si_pid == getpid(),
		       "thread %d: SIGUSR1 with si_code %d from %d, want SI_TKILL/SI_USER from %d", i,
		       si.si_code, (int)si.si_pid, (int)getpid());
}

static void *run(void *arg)
{
	int i = (int)(intptr_t)arg;
	uint64_t pattern = 0x0123456789abcdefULL ^ ((uint64_t)i * 0x1111111111111111ULL);
	char name[16];
	snprintf(name, sizeof(name), "wl-t%02d", i);
	pthread_setname_np(pthread_self(), name);

	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGRTMIN + i);
	if (i == PENDER)
		sigaddset(&mask, SIGUSR1);
	pthread_sigmask(SIG_SETMASK, &mask, NULL);
	stack_t ss = { .ss_sp = altstacks[i], .ss_size = ALTSTACK_SIZE, .ss_flags = 0 };
	if (sigaltstack(&ss, NULL) < 0)
		wl_die("sigaltstack of thread %d", i);
	struct rseq *area = rseq_area();
	uint32_t rseq_len = __rseq_size ? registered_len(area) : 0;
	void *robust_head = NULL;
	size_t robust_len = 0;
	syscall(SYS_get_robust_list, 0, &robust_head, &robust_len);

	uint32_t mx = mxcsr_of(i);
	__asm__ volatile("ldmxcsr %0" : : "m"(mx));

	tids[i] = gettid();
	count(i);
	__atomic_store_n(&set_up[i], 1, __ATOMIC_RELEASE);

	const char *err = NULL;
	while (!go_flag && !err) {
		err = wait_once(i, pattern);
		count(i);
	}
	if (err)
		TFAIL("thread %d (%s): %s", i, kind_names[kind_of(i)], err);

	/* Keep going after go: the counters still move together. */
	long at_go = slots[i];
	if (wl_sabotage && i == 0)
		slots[0] += 1000;
	for (int k = 0; k < AFTER_GO; k++) {
		if (kind_of(i) != CONDWAIT && kind_of(i) != FUTEX && (err = wait_once(i, pattern)))
			TFAIL("thread %d (%s) after go: %s", i, kind_names[kind_of(i)], err);
		count(i);
	}
	TCHECK(slots[i] == at_go + AFTER_GO && tls_count == slots[i],
	       "thread %d (%s): TLS counter %ld, slot %ld, want both %ld", i,
	       kind_names[kind_of(i)], tls_count, slots[i], at_go + AFTER_GO);
	TCHECK(gettid() == tids[i], "thread %d: tid %d, was %d at ready", i, (int)gettid(),
	       (int)tids[i]);
	uint64_t m = current_mask();
	TCHECK(m == mask_of(i), "thread %d: blocked mask %#llx, want %#llx", i,
	       (unsigned long long)m, (unsigned long long)mask_of(i));
	TCHECK(mxcsr_now() == mxcsr_of(i), "thread %d: MXCSR %#x, want %#x", i, mxcsr_now(),
	       mxcsr_of(i));
	stack_t now;
	if (sigaltstack(NULL, &now) < 0)
		TFAIL("thread %d: sigaltstack: %s", i, strerror(errno));
	else
		TCHECK(now.ss_sp == altstacks[i] && now.ss_size == ALTSTACK_SIZE && now.ss_flags == 0,
		       "thread %d: altstack %p/%zu/%d, want %p/%d/0", i, now.ss_sp, now.ss_size,
		       now.ss_flags, (void *)altstacks[i], ALTSTACK_SIZE);
	if (rseq_len) {
		errno = 0;
		long rc = syscall(SYS_rseq, area, rseq_len, 0, RSEQ_SIG);
		TCHECK(rc < 0 && errno == EBUSY, "thread %d: rseq(%p, %u) gave %ld errno %d, want "
		       "EBUSY: not registered as before", i, (void *)area, rseq_len, rc, errno);
		sched_yield();
		TCHECK((int)((volatile struct rseq *)area)->cpu_id >= 0,
		       "thread %d: rseq cpu_id %d: the kernel does not update the area", i,
		       (int)((volatile struct rseq *)area)->cpu_id);
	}
	void *head_now = NULL;
	size_t len_now = 0;
	syscall(SYS_get_robust_list, 0, &head_now, &len_now);
	TCHECK(head_now == robust_head && len_now == robust_len,
	       "thread %d: robust list %p/%zu, was %p/%zu", i, head_now, len_now, robust_head,
	       robust_len);
	check_comm(i, tids[i]);
	if (i == PENDER)
		check_pending(i, tids[i]);
	return NULL;
}

static int cmp_int(const void *a, const void *b)
{
	return *(const int *)a - *(const int *)b;
}

/* /proc/self/task: sorted tids into out; their number. */
static int list_tasks(int *out, int max)
{
	DIR *d = opendir("/proc/self/task");
	int n = 0;
	struct dirent *e;
	if (!d)
		return -1;
	while ((e = readdir(d)) && n < max)
		if (e->d_name[0] != '.')
			out[n++] = atoi(e->d_name);
	closedir(d);
	qsort(out, (size_t)n, sizeof(int), cmp_int);
	return n;
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	if (__rseq_size == 0)
		wl_die("glibc did not register rseq (needs glibc 2.35+ and a kernel with rseq)");
	for (int i = 0; i < NTHREADS; i++)
		if (pthread_create(&threads[i], NULL, run, (void *)(intptr_t)i) != 0)
			wl_die("pthread_create %d", i);
	for (int i = 0; i < NTHREADS; i++)
		while (!__atomic_load_n(&set_up[i], __ATOMIC_ACQUIRE))
			wl_nap();
	if (pthread_kill(threads[PENDER], SIGUSR1) != 0)
		wl_die("pthread_kill");
	/* Let every thread settle in its call. */
	for (int k = 0; k < 5; k++)
		wl_nap();

	int want[NTHREADS + 1];
	char list[NTHREADS * 12 + 16] = "";
	size_t len = 0;
	want[0] = getpid();
	for (int i = 0; i < NTHREADS; i++)
		want[i + 1] = tids[i];
	qsort(want, NTHREADS + 1, sizeof(int), cmp_int);
	for (int i = 0; i < NTHREADS + 1; i++)
		len += (size_t)snprintf(list + len, sizeof(list) - len, "%s%d", i ? "," : "", want[i]);
	wl_ready("tids=%s\nthreads=%d\n", list, NTHREADS);
	wl_wait_go(NULL);

	int now[NTHREADS + 8];
	int n = list_tasks(now, NTHREADS + 8);
	CHECK(n == NTHREADS + 1 && memcmp(now, want, sizeof(want)) == 0,
	      "/proc/self/task has %d tasks, not the %d of ready (%s)", n, NTHREADS + 1, list);
	CHECK(gettid() == getpid(), "main thread tid %d is not the pid %d", (int)gettid(), (int)getpid());

	pthread_mutex_lock(&mu);
	go_flag = 1;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	__atomic_store_n(&futex_word, 1, __ATOMIC_RELEASE);
	futex(&futex_word, FUTEX_WAKE_PRIVATE, NTHREADS);

	/* One deadline for all joins: a verdict must come well within the
	 * harness's 30 s, also when no join can succeed. */
	struct timespec dl;
	clock_gettime(CLOCK_REALTIME, &dl);
	dl.tv_sec += 5;
	for (int i = 0; i < NTHREADS; i++) {
		int rc = pthread_timedjoin_np(threads[i], NULL, &dl);
		CHECK(rc == 0, "thread %d not joined: %s (clear-child-tid lost?)", i, strerror(rc));
	}
	return wl_finish();
}
