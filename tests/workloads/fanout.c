/*
 * fanout.c - a process tree of N processes (argv[2], default 50) for the
 * scaling benchmark: process i forks processes 8i+1 .. 8i+8 (those below N),
 * so the tree is wide and shallow, as a container's usually is.
 *
 * Every process counts while it waits for go, then checks that its pid,
 * parent and counter survived and writes DIR/r.PID (PASS or its failures).
 * The root writes ready once all N have started (each writes DIR/p.PID) and
 * the verdict once all N-1 others checked. Every process dies with its
 * parent (PR_SET_PDEATHSIG), so killing the root ends the tree.
 * WL_SABOTAGE: every non-root process reports a wrong counter.
 */
#include "wl.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#define FANOUT 8
#define MAX_TASKS 4096
#define DEADLINE_NAPS 3000   /* 30 s for the others to report */

static volatile unsigned long counter;
static int tasks = 50;
static pid_t my_pid, my_ppid;

static void tick(void) { counter++; }

static void report(char prefix, const char *text)
{
	char name[64];
	snprintf(name, sizeof(name), "%c.%d", prefix, (int)my_pid);
	if (wl_write_file(name, text) < 0)
		wl_die("write %s", name);
}

static void spawn_children(int index);

static void member(int index)
{
	my_pid = getpid();
	my_ppid = getppid();
	spawn_children(index);
	report('p', "started\n");
	while (!wl_go_exists()) {
		tick();
		wl_nap();
	}
	unsigned long before = counter;
	tick();
	if (wl_sabotage)
		counter += 5;
	CHECK_EQ("pid", getpid(), my_pid);
	CHECK_EQ("ppid", getppid(), my_ppid);
	CHECK(before > 0 && counter == before + 1, "counter %lu lost (now %lu)", before, counter);
	report('r', wl_nfail ? wl_failures : "PASS\n");
	while (wait(NULL) > 0)
		;
	_exit(0);
}

static void spawn_children(int index)
{
	for (int c = FANOUT * index + 1; c <= FANOUT * index + FANOUT && c < tasks; c++) {
		pid_t pid = fork();
		if (pid < 0)
			wl_die("fork");
		if (pid == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			member(c);
		}
	}
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	if (argc > 2)
		tasks = atoi(argv[2]);
	if (tasks < 1 || tasks > MAX_TASKS)
		wl_die("bad number of processes %d", tasks);
	my_pid = getpid();
	my_ppid = getppid();
	spawn_children(0);
	int naps = 0;
	while (wl_count_reports('p') < tasks - 1) {
		if (++naps > DEADLINE_NAPS)
			wl_die("only %d of %d processes started", wl_count_reports('p') + 1, tasks);
		wl_nap();
	}
	wl_ready("tasks=%d\n", tasks);
	wl_wait_go(tick);
	unsigned long before = counter;
	tick();
	CHECK_EQ("pid", getpid(), my_pid);
	CHECK(before > 0 && counter == before + 1, "counter %lu lost", before);
	wl_check_member_reports(tasks - 1, DEADLINE_NAPS);
	int rc = wl_finish();
	while (wait(NULL) > 0)
		;
	return rc;
}
