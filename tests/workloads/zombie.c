/*
 * zombie.c - unreaped children and a parent blocked in waitpid.
 *
 * The root leaves three children unreaped: exited with 3, exited with 7,
 * killed by SIGTERM. Its child W is blocked in waitpid on three children
 * of its own that exit after go with 11, 12 and 13. After go the root
 * reaps each zombie and checks its status (same pid, same status), and
 * W's exit code (0: every status it reaped was right).
 * WL_SABOTAGE: the root reaps a zombie before checking it was there.
 */
#include "wl.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#define WAITED 3

static pid_t make(int code)
{
	pid_t pid = fork();
	if (pid < 0)
		wl_die("fork");
	if (pid == 0) {
		if (code < 0)
			for (;;)
				pause();
		_exit(code);
	}
	return pid;
}

static int is_zombie(pid_t pid)
{
	char path[64], buf[512];
	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	if (wl_read_file(path, buf, sizeof(buf)) < 0)
		return 0;
	char *close = strrchr(buf, ')');
	return close && close[2] == 'Z';
}

static void waiter(void)
{
	pid_t kids[WAITED];
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	for (int i = 0; i < WAITED; i++) {
		kids[i] = fork();
		if (kids[i] < 0)
			_exit(2);
		if (kids[i] == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			while (!wl_go_exists())
				wl_nap();
			_exit(11 + i);
		}
	}
	wl_write_file("waiting", "yes\n");
	int bad = 0;
	for (int n = 0; n < WAITED; n++) {
		int status;
		pid_t got = waitpid(-1, &status, 0);   /* blocked here across c/r */
		int i;
		for (i = 0; i < WAITED && kids[i] != got; i++)
			;
		if (i == WAITED || !WIFEXITED(status) || WEXITSTATUS(status) != 11 + i)
			bad = 1;
	}
	_exit(bad);
}

static void check_reaped(const char *what, pid_t pid, int exited, int value)
{
	int status;
	pid_t got = waitpid(pid, &status, WNOHANG);
	if (got != pid) {
		wl_fail("%s (pid %d): waitpid gave %d (%s)", what, pid, got,
			got < 0 ? strerror(errno) : "still running");
		return;
	}
	if (exited)
		CHECK(WIFEXITED(status) && WEXITSTATUS(status) == value,
		      "%s (pid %d): status %#x, want exit %d", what, pid, status, value);
	else
		CHECK(WIFSIGNALED(status) && WTERMSIG(status) == value,
		      "%s (pid %d): status %#x, want signal %d", what, pid, status, value);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	pid_t z3 = make(3), z7 = make(7), zterm = make(-1);
	kill(zterm, SIGTERM);
	pid_t w = fork();
	if (w < 0)
		wl_die("fork");
	if (w == 0)
		waiter();
	char path[PATH_MAX + 64];
	snprintf(path, sizeof(path), "%s/waiting", wl_dir);
	for (int naps = 0; !(is_zombie(z3) && is_zombie(z7) && is_zombie(zterm)
			     && access(path, F_OK) == 0); naps++) {
		if (naps > 1000)
			wl_die("children not ready");
		wl_nap();
	}
	wl_ready("z3=%d\nz7=%d\nzterm=%d\nwaiter=%d\n", z3, z7, zterm, w);
	wl_wait_go(NULL);
	if (wl_sabotage)
		waitpid(z7, NULL, 0);
	check_reaped("exit 3", z3, 1, 3);
	check_reaped("exit 7", z7, 1, 7);
	check_reaped("SIGTERM", zterm, 0, SIGTERM);
	int status;
	pid_t got;
	while ((got = waitpid(w, &status, 0)) < 0 && errno == EINTR)
		;
	CHECK(got == w && WIFEXITED(status) && WEXITSTATUS(status) == 0,
	      "the waiter (pid %d) reaped wrong statuses: %#x", w, status);
	return wl_finish();
}
