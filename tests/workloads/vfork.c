/*
 * vfork.c - a parent caught in vfork(): it sleeps in the kernel until its
 * child execs or exits, and takes no ptrace stop meanwhile.
 *
 *   vfork DIR [exec|never]
 *
 * The child (running on the parent's memory, so only plain system calls)
 * publishes DIR/ready naming the parent ("pid=") and itself ("child="), then
 * sleeps VFORK_SLEEP_MS and execs `sleep 1000` ("exec", the default), or
 * waits for DIR/go and exits without exec ("never"). The parent, back from
 * vfork, waits for go and checks that its counter survived, that vfork
 * returned its child's pid and that the child (exec mode) runs `sleep`,
 * then kills and reaps it.
 * WL_SABOTAGE: the parent kills its child before checking it.
 */
#include "wl.h"

#include <signal.h>
#include <sys/wait.h>

#define VFORK_SLEEP_MS 200

static volatile unsigned long counter;

static void tick(void) { counter++; }

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	int exec_mode = argc < 3 || strcmp(argv[2], "never") != 0;
	for (int i = 0; i < 1000; i++)
		tick();
	pid_t parent = getpid();
	pid_t child = vfork();
	if (child < 0)
		wl_die("vfork");
	if (child == 0) {
		char text[128];
		snprintf(text, sizeof(text), "pid=%d\nchild=%d\nmode=%s\n", (int)parent,
			 (int)getpid(), exec_mode ? "exec" : "never");
		if (wl_write_file("ready.tmp", text) < 0)
			_exit(126);
		wl_commit_ready();
		if (exec_mode) {
			struct timespec ts = { 0, VFORK_SLEEP_MS * 1000000L };
			nanosleep(&ts, NULL);
			char *args[] = { "sleep", "1000", NULL };
			char *env[] = { NULL };
			execve("/bin/sleep", args, env);
			_exit(127);
		}
		while (!wl_go_exists())
			wl_nap();
		_exit(0);
	}
	unsigned long before = counter;
	wl_wait_go(NULL);
	CHECK_EQ("counter", counter, before);
	CHECK_EQ("counter after the loop", before, 1000);
	if (wl_sabotage) {
		kill(child, SIGKILL);
		waitpid(child, NULL, 0);
	}
	if (exec_mode) {
		/* The kernel lets a vfork parent go early in the child's exec,
		 * before the new program's arguments are in place: look again for
		 * a while before calling it wrong. */
		char path[64], cmd[64] = "";
		snprintf(path, sizeof(path), "/proc/%d/cmdline", (int)child);
		ssize_t n = -1;
		for (int naps = 0; naps < 200; naps++) {
			n = wl_read_file(path, cmd, sizeof(cmd));
			if ((n > 0 && strcmp(cmd, "sleep") == 0) || wl_sabotage)
				break;
			wl_nap();
		}
		CHECK(n > 0 && strcmp(cmd, "sleep") == 0, "child %d is not running sleep",
		      (int)child);
		kill(child, SIGKILL);
	}
	int status = 0;
	CHECK(waitpid(child, &status, 0) == child || wl_sabotage, "vfork child %d not reaped",
	      (int)child);
	return wl_finish();
}
