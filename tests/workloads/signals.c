/*
 * signals.c - signal dispositions, the blocked mask, pending signals (private and
 * shared, with their siginfo) and the alternate stack survive checkpoint/restore.
 *
 * Checked after go:
 *   - the kernel's sigaction (handler, flags, restorer, mask) of every signal 1..64
 *     equals what it was at ready, read with the raw rt_sigaction so the restorer
 *     (which glibc sets and a restore must put back) is included. Set up:
 *       SIGUSR1  SA_RESTART, mask {USR2, TERM}
 *       SIGUSR2  SA_SIGINFO|SA_RESTART, mask {TTOU}
 *       SIGWINCH SA_ONSTACK|SA_RESTART
 *       SIGURG   SA_NODEFER|SA_RESETHAND
 *       SIGPIPE, SIGHUP, SIGTRAP: SIG_IGN
 *   - the blocked mask {INT, QUIT, TTIN, TRAP, RTMIN+3, RTMIN+4}, and SigBlk/SigPnd/ShdPnd
 *     in /proc/self/status
 *   - pending, consumed with sigtimedwait and checked field by field:
 *       private SIGINT (tgkill: SI_TKILL, or SI_USER on newer kernels),
 *       shared SIGQUIT (kill, SI_USER),
 *       shared SIGRTMIN+3 queued twice with values 1111 then 2222 (order kept),
 *       private SIGRTMIN+4 (rt_tgsigqueueinfo, SI_QUEUE, value 3333)
 *   - sigaltstack: same ss_sp/ss_size/ss_flags
 *   - the handlers still work when signals arrive after go: the sa_mask is applied
 *     (and the signal itself blocked) inside the USR1 handler; USR2 gets its
 *     siginfo; WINCH runs on the alternate stack; URG is not blocked inside its
 *     handler (NODEFER) and is reset to SIG_DFL after it (RESETHAND).
 * SIGTRAP ignored and blocked: the checkpointer's own traps are forced SIGTRAPs,
 * which the kernel answers by resetting such a SIGTRAP for good.
 */
#include "wl.h"

#include <signal.h>
#include <sys/mman.h>

#define ALTSTACK_SIZE (64 * 1024)   /* an AVX-512 signal frame alone is ~3 KiB */

struct ksigaction {     /* the kernel's struct sigaction on x86_64 */
	void *handler;
	unsigned long flags;
	void *restorer;
	uint64_t mask;
};

static struct ksigaction g_table[65];
static stack_t g_altstack;

static volatile sig_atomic_t usr1_runs, usr1_mask_ok, usr2_runs, usr2_ok, winch_on_stack,
	winch_runs, urg_runs, urg_unblocked;
static volatile int usr2_code, usr2_value;

static int blocked_now(int sig)
{
	sigset_t cur;
	sigprocmask(SIG_BLOCK, NULL, &cur);
	return sigismember(&cur, sig);
}

static void on_usr1(int sig)
{
	usr1_runs++;
	usr1_mask_ok = blocked_now(SIGUSR2) && blocked_now(SIGTERM) && blocked_now(sig);
}

static void on_usr2(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)uc;
	usr2_runs++;
	usr2_code = si->si_code;
	usr2_value = si->si_value.sival_int;
	usr2_ok = si->si_pid == getpid() && blocked_now(SIGTTOU);
}

static void on_winch(int sig)
{
	char local;
	stack_t ss;
	(void)sig;
	winch_runs++;
	uintptr_t at = (uintptr_t)&local, base = (uintptr_t)g_altstack.ss_sp;
	winch_on_stack = at >= base && at < base + g_altstack.ss_size &&
			 sigaltstack(NULL, &ss) == 0 && (ss.ss_flags & SS_ONSTACK);
}

static void on_urg(int sig)
{
	urg_runs++;
	urg_unblocked = !blocked_now(sig);
}

static void set_handler(int sig, void *fn, int flags, const int *mask_sigs)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	if (flags & SA_SIGINFO)
		sa.sa_sigaction = fn;
	else
		sa.sa_handler = fn;
	sa.sa_flags = flags;
	sigemptyset(&sa.sa_mask);
	for (; mask_sigs && *mask_sigs; mask_sigs++)
		sigaddset(&sa.sa_mask, *mask_sigs);
	if (sigaction(sig, &sa, NULL) < 0)
		wl_die("sigaction %d", sig);
}

static int read_action(int sig, struct ksigaction *out)
{
	return (int)syscall(SYS_rt_sigaction, sig, NULL, out, 8);
}

static void status_masks(char *blk, char *pnd, char *shd, size_t size)
{
	static char status[8192];
	wl_read_file("/proc/self/status", status, sizeof(status));
	wl_status_field(status, "SigBlk", blk, size);
	wl_status_field(status, "SigPnd", pnd, size);
	wl_status_field(status, "ShdPnd", shd, size);
}

static uint64_t bit(int sig)
{
	return 1ULL << (sig - 1);
}

/* Take one pending signal of the given number and check its siginfo.
 * tgkill gives SI_TKILL or SI_USER depending on the kernel version: code2. */
static void take(int sig, int code, int code2, int value)
{
	sigset_t set;
	siginfo_t si;
	struct timespec zero = { 0, 0 };
	sigemptyset(&set);
	sigaddset(&set, sig);
	memset(&si, 0, sizeof(si));
	int got = sigtimedwait(&set, &si, &zero);
	if (got != sig) {
		wl_fail("signal %d was not pending after go (sigtimedwait: %s)", sig,
			got < 0 ? strerror(errno) : "other signal");
		return;
	}
	if ((si.si_code != code && si.si_code != code2) || si.si_pid != getpid() || si.si_uid != getuid())
		wl_fail("signal %d: si_code %d si_pid %d si_uid %d, want %d %d %d", sig,
			si.si_code, si.si_pid, si.si_uid, code, getpid(), getuid());
	if (code == SI_QUEUE && si.si_value.sival_int != value)
		wl_fail("signal %d: si_value %d, want %d", sig, si.si_value.sival_int, value);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	const int rt3 = SIGRTMIN + 3, rt4 = SIGRTMIN + 4;

	static const int usr1_mask[] = { SIGUSR2, SIGTERM, 0 }, usr2_mask[] = { SIGTTOU, 0 };
	set_handler(SIGUSR1, on_usr1, SA_RESTART, usr1_mask);
	set_handler(SIGUSR2, on_usr2, SA_SIGINFO | SA_RESTART, usr2_mask);
	set_handler(SIGWINCH, on_winch, SA_ONSTACK | SA_RESTART, NULL);
	set_handler(SIGURG, on_urg, SA_NODEFER | SA_RESETHAND, NULL);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGHUP, SIG_IGN);
	signal(SIGTRAP, SIG_IGN);

	g_altstack.ss_sp = mmap(NULL, ALTSTACK_SIZE, PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (g_altstack.ss_sp == MAP_FAILED)
		wl_die("mmap altstack");
	g_altstack.ss_size = ALTSTACK_SIZE;
	g_altstack.ss_flags = 0;
	SETUP(sigaltstack(&g_altstack, NULL));

	sigset_t blocked;
	sigemptyset(&blocked);
	const int block[] = { SIGINT, SIGQUIT, SIGTTIN, SIGTRAP, rt3, rt4 };
	for (size_t i = 0; i < sizeof(block) / sizeof(block[0]); i++)
		sigaddset(&blocked, block[i]);
	SETUP(sigprocmask(SIG_SETMASK, &blocked, NULL));

	pid_t pid = getpid(), tid = gettid();
	SETUP(syscall(SYS_tgkill, pid, tid, SIGINT));          /* private */
	SETUP(kill(pid, SIGQUIT));                              /* shared */
	SETUP(sigqueue(pid, rt3, (union sigval){ .sival_int = 1111 }));
	SETUP(sigqueue(pid, rt3, (union sigval){ .sival_int = 2222 }));
	siginfo_t si;
	memset(&si, 0, sizeof(si));
	si.si_signo = rt4;
	si.si_code = SI_QUEUE;
	si.si_pid = pid;
	si.si_uid = getuid();
	si.si_value.sival_int = 3333;
	SETUP(syscall(SYS_rt_tgsigqueueinfo, pid, tid, rt4, &si));  /* private, with a value */

	for (int sig = 1; sig <= 64; sig++)
		if (read_action(sig, &g_table[sig]) < 0)
			wl_die("rt_sigaction(%d)", sig);
	char blk0[32], pnd0[32], shd0[32];
	status_masks(blk0, pnd0, shd0, sizeof(blk0));

	wl_ready("altstack=%p\nSigBlk=%s\nSigPnd=%s\nShdPnd=%s\n", g_altstack.ss_sp, blk0, pnd0, shd0);
	wl_wait_go(NULL);

	if (wl_sabotage)
		set_handler(SIGUSR1, on_usr1, SA_RESTART, NULL);

	/* Dispositions: all 64, exactly. */
	for (int sig = 1; sig <= 64; sig++) {
		struct ksigaction now;
		if (read_action(sig, &now) < 0) {
			wl_fail("rt_sigaction(%d): %s", sig, strerror(errno));
			continue;
		}
		const struct ksigaction *was = &g_table[sig];
		if (now.handler != was->handler || now.flags != was->flags ||
		    now.restorer != was->restorer || now.mask != was->mask)
			wl_fail("signal %d (%s): action was handler %p flags %#lx restorer %p mask %#lx, "
				"now %p %#lx %p %#lx", sig, sigabbrev_np(sig) ? sigabbrev_np(sig) : "RT",
				was->handler, was->flags, was->restorer, (unsigned long)was->mask,
				now.handler, now.flags, now.restorer, (unsigned long)now.mask);
	}
	CHECK(g_table[SIGUSR1].handler == (void *)on_usr1, "SIGUSR1 handler is not on_usr1");
	CHECK(g_table[SIGPIPE].handler == SIG_IGN && g_table[SIGHUP].handler == SIG_IGN &&
	      g_table[SIGTRAP].handler == SIG_IGN, "SIGPIPE/SIGHUP/SIGTRAP not ignored");

	/* Mask and pending sets */
	sigset_t now_blocked;
	sigprocmask(SIG_BLOCK, NULL, &now_blocked);
	for (int sig = 1; sig <= 64; sig++)
		if (sig != SIGKILL && sig != SIGSTOP &&
		    sigismember(&now_blocked, sig) != sigismember(&blocked, sig))
			wl_fail("signal %d: blocked %d, want %d", sig, sigismember(&now_blocked, sig),
				sigismember(&blocked, sig));
	char blk[32], pnd[32], shd[32];
	status_masks(blk, pnd, shd, sizeof(blk));
	CHECK(strcmp(blk, blk0) == 0, "SigBlk was %s, now %s", blk0, blk);
	CHECK(strcmp(pnd, pnd0) == 0, "SigPnd (private pending) was %s, now %s", pnd0, pnd);
	CHECK(strcmp(shd, shd0) == 0, "ShdPnd (shared pending) was %s, now %s", shd0, shd);
	CHECK(strtoull(pnd, NULL, 16) == (bit(SIGINT) | bit(rt4)), "SigPnd %s: want SIGINT and RTMIN+4", pnd);
	CHECK(strtoull(shd, NULL, 16) == (bit(SIGQUIT) | bit(rt3)), "ShdPnd %s: want SIGQUIT and RTMIN+3", shd);

	take(SIGINT, SI_TKILL, SI_USER, 0);
	take(SIGQUIT, SI_USER, SI_USER, 0);
	take(rt3, SI_QUEUE, SI_QUEUE, 1111);
	take(rt3, SI_QUEUE, SI_QUEUE, 2222);
	take(rt4, SI_QUEUE, SI_QUEUE, 3333);
	sigset_t pending;
	sigpending(&pending);
	for (int sig = 1; sig <= 64; sig++)
		CHECK(!sigismember(&pending, sig), "signal %d still pending after taking all", sig);

	stack_t ss;
	CHECK_SYS(sigaltstack(NULL, &ss));
	CHECK(ss.ss_sp == g_altstack.ss_sp && ss.ss_size == g_altstack.ss_size && ss.ss_flags == 0,
	      "sigaltstack was %p/%zu/0, now %p/%zu/%d", g_altstack.ss_sp, g_altstack.ss_size,
	      ss.ss_sp, ss.ss_size, ss.ss_flags);

	/* The handlers run, with their flags and masks. */
	raise(SIGUSR1);
	CHECK(usr1_runs == 1, "SIGUSR1 handler ran %d times", (int)usr1_runs);
	CHECK(usr1_mask_ok, "inside the SIGUSR1 handler USR2, TERM and USR1 were not all blocked");
	CHECK_SYS(sigqueue(getpid(), SIGUSR2, (union sigval){ .sival_int = 4444 }));
	CHECK(usr2_runs == 1 && usr2_code == SI_QUEUE && usr2_value == 4444 && usr2_ok,
	      "SIGUSR2 SA_SIGINFO handler: runs %d si_code %d value %d pid/mask ok %d",
	      (int)usr2_runs, usr2_code, usr2_value, (int)usr2_ok);
	raise(SIGWINCH);
	CHECK(winch_runs == 1 && winch_on_stack, "SIGWINCH handler ran %d times, on the alternate stack: %d",
	      (int)winch_runs, (int)winch_on_stack);
	raise(SIGURG);
	CHECK(urg_runs == 1 && urg_unblocked, "SIGURG (SA_NODEFER) handler ran %d times, unblocked inside: %d",
	      (int)urg_runs, (int)urg_unblocked);
	struct sigaction after;
	sigaction(SIGURG, NULL, &after);
	CHECK(after.sa_handler == SIG_DFL, "SIGURG (SA_RESETHAND) not reset to SIG_DFL after delivery");
	return wl_finish();
}
