/*
 * tree.c - a process tree of 50: the root, 7 children, 6 grandchildren each.
 *
 *   child 0      its own session (setsid); two of its children lead groups
 *   child 1      leads its own group, its children stay in it
 *   child 2      its children 0-2 joined a group whose leader has exited
 *   child 6      an orphan: made by a helper that exited, reparented to the
 *                root (a child subreaper), not its creator's child any more;
 *                it and its children stay in the helper's session and group
 *
 * Every process writes DIR/p.PID ("pid ppid pgid sid") before ready, counts
 * while it waits, and after go checks that the four ids and its counter
 * survived, writing DIR/r.PID (PASS or its failures). The root writes ready
 * once all 50 reported and the verdict once all 50 checked. Every process
 * dies with its parent (PR_SET_PDEATHSIG), so killing the root ends the tree.
 * WL_SABOTAGE: each member of another's group leaves it after go.
 */
#include "wl.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#define CHILDREN 7
#define GRANDCHILDREN 6
#define TASKS (1 + CHILDREN + CHILDREN * GRANDCHILDREN)
#define DEADLINE_NAPS 1000   /* 10 s for the others to report */

static volatile unsigned long counter;
static int ids[4];

static void tick(void) { counter++; }

static void record_ids(void)
{
	char name[64], text[128];
	ids[0] = getpid(); ids[1] = getppid(); ids[2] = getpgrp(); ids[3] = getsid(0);
	snprintf(name, sizeof(name), "p.%d", ids[0]);
	snprintf(text, sizeof(text), "%d %d %d %d\n", ids[0], ids[1], ids[2], ids[3]);
	if (wl_write_file(name, text) < 0)
		wl_die("write %s", name);
}

static void check_ids(void)
{
	CHECK_EQ("pid", getpid(), ids[0]);
	CHECK_EQ("ppid", getppid(), ids[1]);
	CHECK_EQ("pgid", getpgrp(), ids[2]);
	CHECK_EQ("sid", getsid(0), ids[3]);
}

/* p.PID or r.PID, not the NAME.tmp a writer is still filling. */
/* A non-root member: report, count until go, check, write r.PID, wait for
 * its own children, exit. */
static void member(void)
{
	record_ids();
	unsigned long before;
	while (!wl_go_exists()) {
		tick();
		wl_nap();
	}
	before = counter;
	tick();
	if (wl_sabotage && getpgrp() != getpid() && getsid(0) != getpid())
		setpgid(0, 0);
	check_ids();
	CHECK(before > 0 && counter == before + 1, "counter %lu lost", before);
	char name[64];
	snprintf(name, sizeof(name), "r.%d", ids[0]);
	wl_write_file(name, wl_nfail ? wl_failures : "PASS\n");
	while (wait(NULL) > 0)
		;
	_exit(0);
}

static pid_t spawn(void (*body)(int), int arg)
{
	pid_t pid = fork();
	if (pid < 0)
		wl_die("fork");
	if (pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		body(arg);
		_exit(0);
	}
	return pid;
}

static void grandchild(int kind)
{
	if (kind == 1)
		SETUP(setpgid(0, 0));
	else if (kind > 1)
		SETUP(setpgid(0, kind));   /* join group `kind` */
	member();
}

static void leaderless_group_parent(void)
{
	/* A leader that only makes its group, lets members in, then exits. */
	pid_t leader = fork();
	if (leader < 0)
		wl_die("fork");
	if (leader == 0) {
		setpgid(0, 0);
		for (;;)
			pause();
	}
	SETUP(setpgid(leader, leader));   /* whichever of us gets there first */
	for (int i = 0; i < GRANDCHILDREN; i++)
		spawn(grandchild, i < 3 ? leader : 0);
	/* Wait for the members to be in, then let the leader go and reap it. */
	for (int naps = 0; naps < DEADLINE_NAPS; naps++) {
		char path[64], buf[256];
		int joined = 0;
		snprintf(path, sizeof(path), "/proc/%d/task/%d/children", getpid(), getpid());
		ssize_t n = wl_read_file(path, buf, sizeof(buf));
		if (n > 0) {
			char *p = buf;
			while (*p) {
				int pid = (int)strtol(p, &p, 10);
				if (pid > 0 && pid != leader && getpgid(pid) == leader)
					joined++;
				while (*p == ' ' || *p == '\n')
					p++;
			}
		}
		if (joined == 3)
			break;
		wl_nap();
	}
	kill(leader, SIGKILL);
	SETUP(waitpid(leader, NULL, 0));
}

static void child(int index)
{
	switch (index) {
	case 0:
		SETUP(setsid());
		for (int i = 0; i < GRANDCHILDREN; i++)
			spawn(grandchild, i >= 4 ? 1 : 0);
		break;
	case 1:
		SETUP(setpgid(0, 0));
		for (int i = 0; i < GRANDCHILDREN; i++)
			spawn(grandchild, 0);
		break;
	case 2:
		leaderless_group_parent();
		break;
	case 6:
		/* Made by a helper that exits: wait to be the root's. */
		while (getppid() == ids[0])
			wl_nap();
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		/* fall through */
	default:
		for (int i = 0; i < GRANDCHILDREN; i++)
			spawn(grandchild, 0);
	}
	member();
}

static void orphan_maker(int unused)
{
	(void)unused;
	ids[0] = getpid();
	SETUP(setsid());   /* the orphan's session and group outlive their leader */
	pid_t pid = fork();
	if (pid < 0)
		wl_die("fork");
	if (pid == 0)
		child(6);
	_exit(0);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	SETUP(prctl(PR_SET_CHILD_SUBREAPER, 1));
	for (int i = 0; i < CHILDREN - 1; i++)
		spawn(child, i);
	pid_t helper = spawn(orphan_maker, 0);
	SETUP(waitpid(helper, NULL, 0));
	record_ids();
	int naps = 0;
	while (wl_count_reports('p') < TASKS) {
		if (++naps > DEADLINE_NAPS)
			wl_die("only %d of %d processes reported", wl_count_reports('p'), TASKS);
		wl_nap();
	}
	wl_ready("tasks=%d\n", TASKS);
	wl_wait_go(tick);
	unsigned long before = counter;
	tick();
	check_ids();
	CHECK(before > 0 && counter == before + 1, "counter %lu lost", before);
	wl_check_member_reports(TASKS - 1, DEADLINE_NAPS);
	int rc = wl_finish();
	while (wait(NULL) > 0)
		;
	return rc;
}
