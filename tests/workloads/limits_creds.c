/*
 * limits_creds.c - resource limits, credentials and per-task attributes survive
 * checkpoint/restore. Starts as root and drops privileges itself.
 *
 * Set up, in this order (limits and attributes first: after dropping to uid 1000
 * some could no longer be set; the restore must respect the same order):
 *   rlimits   NOFILE 512/1024, CORE 0/0, STACK 4/16 MiB, NPROC 2000/3000, CPU 3600/7200
 *   personality ADDR_NO_RANDOMIZE; comm "wl-creds"; timer slack 123456 ns;
 *   SCHED_BATCH; nice 5
 *   groups {1000, 1001}; resgid 1000/1001/1002; resuid 1000/1001/1002 (all capabilities
 *   are dropped by the kernel, the bounding set stays); no_new_privs
 *
 * Checked after go: getresuid/getresgid/getgroups exactly; fsuid/fsgid follow the
 * effective ids (and a file created now is owned by 1001:1001); all 16 rlimits as at
 * ready; Cap{Inh,Prm,Eff,Bnd,Amb} and NoNewPrivs lines of /proc/self/status as at
 * ready, with no effective capabilities (setuid(0) fails); comm, nice, policy,
 * personality, timer slack, dumpable, securebits, keepcaps as at ready.
 *
 * DIR is made world-writable and held open as a directory fd before the drop:
 * uid 1000 may not be able to reach DIR by its path (pytest's tmp dirs are 0700).
 */
#include "wl.h"

#include <grp.h>
#include <sched.h>
#include <sys/fsuid.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>

#define TIMERSLACK_NS 123456
#define NICE 5

static const gid_t groups[] = { 1000, 1001 };

struct limit {
	int resource;
	const char *name;
	rlim_t soft, hard;
};

static const struct limit limits[] = {
	{ RLIMIT_NOFILE, "NOFILE", 512, 1024 },
	{ RLIMIT_CORE, "CORE", 0, 0 },
	{ RLIMIT_STACK, "STACK", 4 << 20, 16 << 20 },
	{ RLIMIT_NPROC, "NPROC", 2000, 3000 },
	{ RLIMIT_CPU, "CPU", 3600, 7200 },
};

static struct rlimit g_all[RLIM_NLIMITS];
static char g_status[16384], g_now[16384];
static const char *const cap_fields[] = { "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
					  "NoNewPrivs" };
#define NCAPF (sizeof(cap_fields) / sizeof(cap_fields[0]))

static void set_limit(const struct limit *l)
{
	struct rlimit cur, want = { l->soft, l->hard };
	if (getrlimit(l->resource, &cur) < 0)
		wl_die("getrlimit %s", l->name);
	/* Raising a hard limit needs CAP_SYS_RESOURCE, which root lacks here. */
	if (cur.rlim_max != RLIM_INFINITY && cur.rlim_max < want.rlim_max)
		wl_die("RLIMIT_%s hard limit %lu is below %lu", l->name, (unsigned long)cur.rlim_max,
		       (unsigned long)want.rlim_max);
	if (setrlimit(l->resource, &want) < 0)
		wl_die("setrlimit %s", l->name);
}

static int get_prctl(int option)
{
	return prctl(option, 0, 0, 0, 0);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	if (geteuid() != 0)
		wl_die("must start as root (it drops privileges itself)");
	SETUP(chmod(wl_dir, 0777));
	wl_hold_dir();

	for (size_t i = 0; i < sizeof(limits) / sizeof(limits[0]); i++)
		set_limit(&limits[i]);
	SETUP(personality(PER_LINUX | ADDR_NO_RANDOMIZE));
	SETUP(prctl(PR_SET_NAME, "wl-creds", 0, 0, 0));
	SETUP(prctl(PR_SET_TIMERSLACK, TIMERSLACK_NS, 0, 0, 0));
	struct sched_param sp = { .sched_priority = 0 };
	SETUP(sched_setscheduler(0, SCHED_BATCH, &sp));
	SETUP(setpriority(PRIO_PROCESS, 0, NICE));

	SETUP(setgroups(2, groups));
	SETUP(setresgid(1000, 1001, 1002));
	SETUP(setresuid(1000, 1001, 1002));
	SETUP(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0));

	for (int r = 0; r < RLIM_NLIMITS; r++)
		SETUP(getrlimit(r, &g_all[r]));
	SETUP(wl_read_file("/proc/self/status", g_status, sizeof(g_status)));
	const int dumpable = get_prctl(PR_GET_DUMPABLE), securebits = get_prctl(PR_GET_SECUREBITS);
	const int keepcaps = get_prctl(PR_GET_KEEPCAPS);
	const int persona = personality(0xffffffff);
	char capeff[32];
	wl_status_field(g_status, "CapEff", capeff, sizeof(capeff));

	wl_ready("uid=1000,1001,1002\ngid=1000,1001,1002\ngroups=1000,1001\nCapEff=%s\n"
		 "nice=%d\ndumpable=%d\n", capeff, NICE, dumpable);
	wl_wait_go(NULL);

	if (wl_sabotage)
		setpriority(PRIO_PROCESS, 0, NICE + 1);

	uid_t ru, eu, su;
	gid_t rg, eg, sg;
	CHECK_SYS(getresuid(&ru, &eu, &su));
	CHECK_SYS(getresgid(&rg, &eg, &sg));
	CHECK(ru == 1000 && eu == 1001 && su == 1002, "resuid %d/%d/%d, want 1000/1001/1002",
	      (int)ru, (int)eu, (int)su);
	CHECK(rg == 1000 && eg == 1001 && sg == 1002, "resgid %d/%d/%d, want 1000/1001/1002",
	      (int)rg, (int)eg, (int)sg);
	CHECK_EQ("fsuid", setfsuid((uid_t)-1), 1001);
	CHECK_EQ("fsgid", setfsgid((gid_t)-1), 1001);
	gid_t now_groups[64];
	int ng = getgroups(64, now_groups);
	CHECK(ng == 2 && now_groups[0] == 1000 && now_groups[1] == 1001,
	      "getgroups gave %d groups (%d, %d ...), want 1000, 1001", ng,
	      ng > 0 ? (int)now_groups[0] : -1, ng > 1 ? (int)now_groups[1] : -1);
	int fd = openat(wl_dirfd, "owned", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0)
		wl_fail("create DIR/owned after go: %s", strerror(errno));
	else
		CHECK(st.st_uid == 1001 && st.st_gid == 1001, "a new file is owned by %d:%d, want 1001:1001",
		      (int)st.st_uid, (int)st.st_gid);
	if (fd >= 0)
		close(fd);

	for (int r = 0; r < RLIM_NLIMITS; r++) {
		struct rlimit l;
		CHECK_SYS(getrlimit(r, &l));
		CHECK(l.rlim_cur == g_all[r].rlim_cur && l.rlim_max == g_all[r].rlim_max,
		      "rlimit %d was %lu/%lu, now %lu/%lu", r, (unsigned long)g_all[r].rlim_cur,
		      (unsigned long)g_all[r].rlim_max, (unsigned long)l.rlim_cur, (unsigned long)l.rlim_max);
	}
	for (size_t i = 0; i < sizeof(limits) / sizeof(limits[0]); i++) {
		const struct limit *want = &limits[i];
		struct rlimit l;
		getrlimit(want->resource, &l);
		CHECK(l.rlim_cur == want->soft && l.rlim_max == want->hard, "RLIMIT_%s is %lu/%lu, want %lu/%lu",
		      want->name, (unsigned long)l.rlim_cur, (unsigned long)l.rlim_max,
		      (unsigned long)want->soft, (unsigned long)want->hard);
	}

	wl_read_file("/proc/self/status", g_now, sizeof(g_now));
	for (size_t i = 0; i < NCAPF; i++) {
		char was[64], now[64];
		wl_status_field(g_status, cap_fields[i], was, sizeof(was));
		wl_status_field(g_now, cap_fields[i], now, sizeof(now));
		CHECK(strcmp(was, now) == 0, "%s was %s, now %s", cap_fields[i], was, now);
	}
	wl_status_field(g_now, "CapEff", capeff, sizeof(capeff));
	CHECK(strtoull(capeff, NULL, 16) == 0, "CapEff is %s, want none after dropping root", capeff);
	CHECK(setuid(0) < 0 && errno == EPERM, "setuid(0) did not fail with EPERM: root again?");
	CHECK_EQ("PR_GET_NO_NEW_PRIVS", get_prctl(PR_GET_NO_NEW_PRIVS), 1);

	char name[17] = "";
	prctl(PR_GET_NAME, name, 0, 0, 0);
	CHECK(strcmp(name, "wl-creds") == 0, "comm is '%s', want wl-creds", name);
	errno = 0;
	int nice_now = getpriority(PRIO_PROCESS, 0);
	CHECK(errno == 0 && nice_now == NICE, "nice is %d, want %d", nice_now, NICE);
	CHECK_EQ("sched policy (SCHED_BATCH=3)", sched_getscheduler(0), SCHED_BATCH);
	CHECK_EQ("personality", personality(0xffffffff), persona);
	CHECK(persona & ADDR_NO_RANDOMIZE, "personality %#x lacks ADDR_NO_RANDOMIZE", persona);
	CHECK_EQ("timer slack (ns)", get_prctl(PR_GET_TIMERSLACK), TIMERSLACK_NS);
	CHECK_EQ("PR_GET_DUMPABLE", get_prctl(PR_GET_DUMPABLE), dumpable);
	CHECK_EQ("PR_GET_SECUREBITS", get_prctl(PR_GET_SECUREBITS), securebits);
	CHECK_EQ("PR_GET_KEEPCAPS", get_prctl(PR_GET_KEEPCAPS), keepcaps);
	return wl_finish();
}
