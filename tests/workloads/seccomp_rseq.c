/*
 * seccomp_rseq.c - rseq registration, the robust futex list, CPU affinity and
 * seccomp filters survive checkpoint/restore.
 *
 * Checked after go:
 *   - rseq: glibc (2.35+) registered an rseq area for the main thread at
 *     thread pointer + __rseq_offset (if it did not, we register our own). The
 *     registration is still exactly the same: sys_rseq with the same (area, len,
 *     sig) answers EBUSY (EINVAL would mean another area or length, EPERM another
 *     signature, success that nothing was registered). The kernel still updates
 *     the area: pinned to each allowed CPU in turn, rseq->cpu_id and cpu_id_start
 *     follow getcpu().
 *   - CPU affinity as at ready (a restorer must not leave its own pinning behind)
 *   - set_robust_list: get_robust_list returns our head and its length
 *   - seccomp, installed last, two stacked filters: getppid -> EPERM,
 *     sysinfo -> EDOM; /proc/self/status shows Seccomp 2 and Seccomp_filters 2.
 *     Nothing in the protocol (open, write, rename, nanosleep, access) is filtered.
 */
#include "wl.h"

#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/futex.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/rseq.h>
#include <sys/sysinfo.h>

static struct rseq own_rseq __attribute__((aligned(32)));
static struct robust_list_head head = { .list = { &head.list }, .futex_offset = 16 };
static struct robust_list_head other_head = { .list = { &other_head.list } };
static char g_status[16384];

static struct rseq *rseq_area(int *glibc_owned)
{
	*glibc_owned = __rseq_size > 0;
	if (*glibc_owned)
		return (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
	return &own_rseq;
}

static long rseq_register(struct rseq *area, uint32_t len)
{
	return syscall(SYS_rseq, area, len, 0, RSEQ_SIG);
}

/* Find the length the area is registered with: only that one answers EBUSY. */
static uint32_t registered_len(struct rseq *area)
{
	const uint32_t candidates[] = { __rseq_size, sizeof(struct rseq), 32 };
	for (size_t i = 0; i < sizeof(candidates) / sizeof(candidates[0]); i++)
		if (candidates[i] && rseq_register(area, candidates[i]) < 0 && errno == EBUSY)
			return candidates[i];
	return 0;
}

static int raw_getcpu(void)
{
	unsigned cpu = 0;
	if (syscall(SYS_getcpu, &cpu, NULL, NULL) < 0)
		return -1;
	return (int)cpu;
}

/* Pinned to each CPU in turn, the kernel must write that CPU into the area. */
static void check_rseq_follows_cpu(volatile struct rseq *area, const cpu_set_t *allowed)
{
	for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
		if (!CPU_ISSET(cpu, allowed))
			continue;
		cpu_set_t one;
		CPU_ZERO(&one);
		CPU_SET(cpu, &one);
		if (sched_setaffinity(0, sizeof(one), &one) < 0) {
			wl_fail("sched_setaffinity(cpu %d): %s", cpu, strerror(errno));
			continue;
		}
		sched_yield();
		int on = raw_getcpu();
		CHECK(on == cpu && (int)area->cpu_id == cpu && (int)area->cpu_id_start == cpu,
		      "pinned to cpu %d: getcpu %d, rseq cpu_id %d cpu_id_start %u", cpu, on,
		      (int)area->cpu_id, area->cpu_id_start);
	}
	sched_setaffinity(0, sizeof(*allowed), allowed);
}

static void install_filter(int nr, int err)
{
	struct sock_filter code[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 3),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ((unsigned)err & SECCOMP_RET_DATA)),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { sizeof(code) / sizeof(code[0]), code };
	/* Root may install without no_new_privs; anyone else needs it. */
	if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0) {
		if (errno != EACCES || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
		    syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0)
			wl_die("seccomp filter for syscall %d", nr);
	}
}

static void check_filters(const char *when)
{
	struct sysinfo si;
	/* Through syscall(): glibc's getppid() cannot fail, so it does not set errno. */
	errno = 0;
	CHECK(syscall(SYS_getppid) == -1 && errno == EPERM, "%s: getppid was not refused with EPERM (errno %d)",
	      when, errno);
	errno = 0;
	CHECK(sysinfo(&si) == -1 && errno == EDOM, "%s: sysinfo was not refused with EDOM (errno %d)",
	      when, errno);
	CHECK(getpid() > 0, "%s: getpid failed", when);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);

	int glibc_owned;
	struct rseq *area = rseq_area(&glibc_owned);
	if (!glibc_owned && rseq_register(area, sizeof(*area)) < 0)
		wl_die("rseq registration");
	uint32_t len = registered_len(area);
	if (!len)
		wl_die("no rseq registration found for %p", (void *)area);

	cpu_set_t allowed;
	SETUP(sched_getaffinity(0, sizeof(allowed), &allowed));
	check_rseq_follows_cpu(area, &allowed);

	SETUP(syscall(SYS_set_robust_list, &head, sizeof(head)));

	install_filter(SYS_getppid, EPERM);
	install_filter(SYS_sysinfo, EDOM);
	check_filters("before ready");
	if (wl_nfail)
		wl_die("checks failed before ready: %s", wl_failures);

	wl_ready("rseq=%p\nrseq_len=%u\nrseq_by_glibc=%d\nrobust_head=%p\ncpus=%d\n", (void *)area, len,
		 glibc_owned, (void *)&head, CPU_COUNT(&allowed));
	wl_wait_go(NULL);

	if (wl_sabotage)
		syscall(SYS_set_robust_list, &other_head, sizeof(other_head));

	errno = 0;
	long rc = rseq_register(area, len);
	CHECK(rc < 0 && errno == EBUSY, "rseq(%p, %u, sig %#x) gave %ld errno %d (%s), want EBUSY: "
	      "not registered as before", (void *)area, len, RSEQ_SIG, rc, errno, strerror(errno));
	cpu_set_t now;
	CHECK_SYS(sched_getaffinity(0, sizeof(now), &now));
	CHECK(CPU_EQUAL(&now, &allowed), "CPU affinity changed: %d CPUs allowed, was %d",
	      CPU_COUNT(&now), CPU_COUNT(&allowed));
	check_rseq_follows_cpu(area, &allowed);

	struct robust_list_head *got = NULL;
	size_t got_len = 0;
	CHECK_SYS(syscall(SYS_get_robust_list, 0, &got, &got_len));
	CHECK(got == &head && got_len == sizeof(head), "robust list is %p/%zu, want %p/%zu",
	      (void *)got, got_len, (void *)&head, sizeof(head));
	CHECK(head.list.next == &head.list && head.futex_offset == 16, "robust list head content changed");

	check_filters("after go");
	char mode[16] = "", count[16] = "";
	wl_read_file("/proc/self/status", g_status, sizeof(g_status));
	wl_status_field(g_status, "Seccomp", mode, sizeof(mode));
	wl_status_field(g_status, "Seccomp_filters", count, sizeof(count));
	CHECK(strcmp(mode, "2") == 0, "Seccomp: %s, want 2 (filter)", mode);
	CHECK(strcmp(count, "2") == 0, "Seccomp_filters: %s, want 2", count);
	return wl_finish();
}
