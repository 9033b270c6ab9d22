/*
 * timers.c - interval timers and POSIX timers keep their settings, their ids and
 * keep firing across checkpoint/restore.
 *
 * Set up (all handlers count firings; SA_RESTART so the protocol I/O is unaffected):
 *   ITIMER_REAL     first 30 ms, then every 50 ms  -> SIGALRM
 *   ITIMER_VIRTUAL  every 50 ms of user CPU        -> SIGVTALRM
 *   ITIMER_PROF     every 50 ms of CPU             -> SIGPROF
 *   POSIX timers (one created first and deleted, so the ids in use are not 0, 1, 2):
 *     tick   CLOCK_MONOTONIC, SIGEV_SIGNAL SIGRTMIN+1 value 77, every 20 ms
 *     alarm  CLOCK_BOOTTIME,  SIGEV_SIGNAL SIGRTMIN+2 value 88, once, in 1 hour
 *     idle   CLOCK_REALTIME,  SIGEV_NONE, disarmed
 *
 * Checked after go:
 *   - getitimer: the same interval, a value in (0, interval]
 *   - /proc/self/timers as at ready, in id order (ids, signals, values, notify pid,
 *     clocks)
 *   - timer_gettime works on the timer_t values we hold (a restore that gives a
 *     timer another id breaks this), with the interval and a sane remaining value
 *   - within 2 s (burning CPU so the CPU-time timers advance) every periodic timer
 *     fires again, and tick's siginfo carries its id and value 77; alarm never fired
 */
#include "wl.h"

#include <signal.h>
#include <sys/time.h>

#define ITIMER_MS 50
#define TICK_MS 20
#define ALARM_S 3600
#define REFIRE_TIMEOUT_S 2

static volatile sig_atomic_t n_alrm, n_vtalrm, n_prof, n_tick, n_alarm;
static volatile int tick_timerid = -1, tick_value = -1, tick_code;
static char g_timers[8192], g_now[8192];

static void on_itimer(int sig)
{
	if (sig == SIGALRM)
		n_alrm++;
	else if (sig == SIGVTALRM)
		n_vtalrm++;
	else if (sig == SIGPROF)
		n_prof++;
}

static void on_posix(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (sig == SIGRTMIN + 1) {
		n_tick++;
		tick_timerid = si->si_timerid;
		tick_value = si->si_value.sival_int;
		tick_code = si->si_code;
	} else {
		n_alarm++;
	}
}

static void handle(int sig, int siginfo)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	if (siginfo)
		sa.sa_sigaction = on_posix;
	else
		sa.sa_handler = on_itimer;
	sa.sa_flags = SA_RESTART | (siginfo ? SA_SIGINFO : 0);
	sigemptyset(&sa.sa_mask);
	if (sigaction(sig, &sa, NULL) < 0)
		wl_die("sigaction %d", sig);
}

static int by_id(const void *a, const void *b)
{
	return atoi(*(char *const *)a + 3) - atoi(*(char *const *)b + 3);
}

/* /proc/PID/timers lists timers in hash order, which depends on the order they
 * were created in; only the set matters. Sort the "ID: n" blocks in place. */
static void sort_timers(char *text)
{
	static char copy[8192];
	char *blocks[64];
	size_t n = 0;
	snprintf(copy, sizeof(copy), "%s", text);
	for (char *p = copy; (p = strstr(p, "ID: ")) && n < 64; p++) {
		if (p != copy)
			p[-1] = '\0';
		blocks[n++] = p;
	}
	for (size_t i = 0; i < n; i++) {
		size_t len = strlen(blocks[i]);
		while (len > 0 && blocks[i][len - 1] == '\n')
			blocks[i][--len] = '\0';
	}
	qsort(blocks, n, sizeof(blocks[0]), by_id);
	text[0] = '\0';
	for (size_t i = 0; i < n; i++) {
		strcat(text, blocks[i]);
		strcat(text, "\n");
	}
}

static timer_t make_timer(clockid_t clock, int notify, int sig, int value)
{
	struct sigevent sev;
	timer_t t;
	memset(&sev, 0, sizeof(sev));
	sev.sigev_notify = notify;
	sev.sigev_signo = sig;
	sev.sigev_value.sival_int = value;
	if (timer_create(clock, &sev, &t) < 0)
		wl_die("timer_create");
	return t;
}

static struct timeval ms_tv(long ms)
{
	return (struct timeval){ ms / 1000, (ms % 1000) * 1000 };
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Burn CPU (the CPU-time timers only advance while we run) until cond or timeout. */
static void spin_until(int (*cond)(void), double timeout_s)
{
	double end = now_s() + timeout_s;
	volatile uint64_t x = 0;
	while (!cond() && now_s() < end)
		for (int i = 0; i < 100000; i++)
			x += (uint64_t)i;
}

static int cpu_timers_fired(void)
{
	return n_vtalrm >= 2 && n_prof >= 2;
}

static sig_atomic_t go_alrm, go_vtalrm, go_prof, go_tick;

static int all_fired_again(void)
{
	return n_alrm > go_alrm && n_vtalrm > go_vtalrm && n_prof > go_prof && n_tick > go_tick;
}

static void check_itimer(int which, const char *name)
{
	struct itimerval v;
	if (getitimer(which, &v) < 0) {
		wl_fail("getitimer(%s): %s", name, strerror(errno));
		return;
	}
	long interval_us = v.it_interval.tv_sec * 1000000L + v.it_interval.tv_usec;
	long value_us = v.it_value.tv_sec * 1000000L + v.it_value.tv_usec;
	CHECK(interval_us == ITIMER_MS * 1000L, "%s interval is %ld us, want %d", name, interval_us,
	      ITIMER_MS * 1000);
	CHECK(value_us > 0 && value_us <= ITIMER_MS * 1000L, "%s value is %ld us, want (0, %d]", name,
	      value_us, ITIMER_MS * 1000);
}

static void check_posix(timer_t t, const char *name, long interval_ns, long min_ns, long max_ns)
{
	struct itimerspec v;
	if (timer_gettime(t, &v) < 0) {
		wl_fail("timer_gettime(%s, id %d): %s", name, (int)(intptr_t)t, strerror(errno));
		return;
	}
	long interval = v.it_interval.tv_sec * 1000000000L + v.it_interval.tv_nsec;
	long value = v.it_value.tv_sec * 1000000000L + v.it_value.tv_nsec;
	CHECK(interval == interval_ns, "%s: interval %ld ns, want %ld", name, interval, interval_ns);
	CHECK(value >= min_ns && value <= max_ns, "%s: remaining %ld ns, want [%ld, %ld]", name, value,
	      min_ns, max_ns);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	handle(SIGALRM, 0);
	handle(SIGVTALRM, 0);
	handle(SIGPROF, 0);
	handle(SIGRTMIN + 1, 1);
	handle(SIGRTMIN + 2, 1);

	struct itimerval real = { ms_tv(ITIMER_MS), ms_tv(30) };
	struct itimerval cpu = { ms_tv(ITIMER_MS), ms_tv(ITIMER_MS) };
	SETUP(setitimer(ITIMER_REAL, &real, NULL));
	SETUP(setitimer(ITIMER_VIRTUAL, &cpu, NULL));
	SETUP(setitimer(ITIMER_PROF, &cpu, NULL));

	timer_t first = make_timer(CLOCK_MONOTONIC, SIGEV_NONE, 0, 0);
	timer_t tick = make_timer(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGRTMIN + 1, 77);
	timer_t alarm = make_timer(CLOCK_BOOTTIME, SIGEV_SIGNAL, SIGRTMIN + 2, 88);
	timer_t idle = make_timer(CLOCK_REALTIME, SIGEV_NONE, 0, 0);
	SETUP(timer_delete(first));
	struct itimerspec tick_spec = { { 0, TICK_MS * 1000000L }, { 0, TICK_MS * 1000000L } };
	struct itimerspec alarm_spec = { { 0, 0 }, { ALARM_S, 0 } };
	SETUP(timer_settime(tick, 0, &tick_spec, NULL));
	SETUP(timer_settime(alarm, 0, &alarm_spec, NULL));

	spin_until(cpu_timers_fired, 5.0);
	if (!cpu_timers_fired())
		wl_die("CPU-time timers did not fire while spinning 5 s");

	if (wl_read_file("/proc/self/timers", g_timers, sizeof(g_timers)) < 0)
		wl_die("read /proc/self/timers");
	sort_timers(g_timers);
	wl_ready("tick_id=%d\nalarm_id=%d\nidle_id=%d\nfirings=%d,%d,%d,%d\n", (int)(intptr_t)tick,
		 (int)(intptr_t)alarm, (int)(intptr_t)idle, (int)n_alrm, (int)n_vtalrm, (int)n_prof,
		 (int)n_tick);
	wl_wait_go(NULL);
	go_alrm = n_alrm;
	go_vtalrm = n_vtalrm;
	go_prof = n_prof;
	go_tick = n_tick;

	if (wl_sabotage) {
		struct itimerval other = { ms_tv(ITIMER_MS + 10), ms_tv(ITIMER_MS) };
		setitimer(ITIMER_REAL, &other, NULL);
	}

	check_itimer(ITIMER_REAL, "ITIMER_REAL");
	check_itimer(ITIMER_VIRTUAL, "ITIMER_VIRTUAL");
	check_itimer(ITIMER_PROF, "ITIMER_PROF");

	wl_read_file("/proc/self/timers", g_now, sizeof(g_now));
	sort_timers(g_now);
	CHECK(strcmp(g_now, g_timers) == 0, "/proc/self/timers was:\n%s\nnow:\n%s", g_timers, g_now);

	check_posix(tick, "tick", TICK_MS * 1000000L, 1, TICK_MS * 1000000L);
	check_posix(alarm, "alarm", 0, (ALARM_S - 600) * 1000000000L, ALARM_S * 1000000000L);
	check_posix(idle, "idle", 0, 0, 0);
	CHECK(timer_getoverrun(tick) >= 0, "timer_getoverrun(tick): %s", strerror(errno));

	spin_until(all_fired_again, REFIRE_TIMEOUT_S);
	CHECK(n_alrm > go_alrm, "ITIMER_REAL did not fire within %d s after go", REFIRE_TIMEOUT_S);
	CHECK(n_vtalrm > go_vtalrm, "ITIMER_VIRTUAL did not fire within %d s of CPU after go", REFIRE_TIMEOUT_S);
	CHECK(n_prof > go_prof, "ITIMER_PROF did not fire within %d s of CPU after go", REFIRE_TIMEOUT_S);
	CHECK(n_tick > go_tick, "POSIX timer tick did not fire within %d s after go", REFIRE_TIMEOUT_S);
	CHECK(tick_timerid == (int)(intptr_t)tick && tick_value == 77 && tick_code == SI_TIMER,
	      "tick's siginfo: timer id %d value %d code %d, want %d 77 %d", tick_timerid, tick_value,
	      tick_code, (int)(intptr_t)tick, SI_TIMER);
	CHECK(n_alarm == 0, "the one-hour alarm fired");
	return wl_finish();
}
