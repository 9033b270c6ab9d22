/*
 * clone_flags.c - processes that share kernel objects, made with raw clone:
 *
 *   A   clone(CLONE_FILES)           shares the root's fd table
 *   B   clone(CLONE_FS)              shares the root's cwd/root/umask
 *   C   clone(CLONE_VM|CLONE_SIGHAND) shares the root's memory and handlers
 *   A2  a plain child with a table of its own, and
 *   A3  clone(CLONE_FILES|CLONE_PARENT) by A2: the root's child, A2's table
 *
 * After go each pair shows that the object is still one: the root opens a
 * file and A finds it at that fd, A opens one and the root finds it; A3
 * opens one and A2 finds it; the root changes directory and B is there, B
 * sets the umask and the root has it; the root writes a value C sees, C
 * installs a SIGUSR2 handler the root sees and C's counter (in shared
 * memory) keeps moving. Separate processes write DIR/r.NAME (PASS or their
 * failures); C reports through the memory it shares with the root.
 * WL_SABOTAGE: the root unshares its fd table and fs info after go.
 */
#include "wl.h"

#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#define DEADLINE_NAPS 1000   /* 10 s for the others to answer */
#define SHARED_FD 20         /* opened by the root before A is cloned */
#define A2_FD 21             /* opened by A2 before A3 is cloned */
#define MAGIC 4242

static char c_stack[256 * 1024] __attribute__((aligned(16)));
static volatile unsigned long c_counter;
static volatile int vm_value, vm_ack;
static volatile sig_atomic_t got_usr2;

static void on_usr1(int sig) { (void)sig; }
static void on_usr2(int sig) { (void)sig; got_usr2 = 1; }

static pid_t raw_clone(unsigned long flags)
{
	return (pid_t)syscall(SYS_clone, flags, NULL, NULL, NULL, 0UL);
}

static void path_of(const char *name, char *buf, size_t size)
{
	snprintf(buf, size, "%s/%s", wl_dir, name);
}

static int exists(const char *name)
{
	char p[PATH_MAX + 64];
	path_of(name, p, sizeof(p));
	return access(p, F_OK) == 0;
}

/* Wait until DIR/name exists; its integer contents, or -1 on timeout. */
static long wait_number(const char *name)
{
	char p[PATH_MAX + 64], buf[64];
	path_of(name, p, sizeof(p));
	for (int naps = 0; naps < DEADLINE_NAPS; naps++) {
		if (wl_read_file(p, buf, sizeof(buf)) > 0)
			return strtol(buf, NULL, 10);
		wl_nap();
	}
	return -1;
}

static void write_number(const char *name, long value)
{
	char text[32];
	snprintf(text, sizeof(text), "%ld\n", value);
	if (wl_write_file(name, text) < 0)
		wl_fail("cannot write %s", name);
}

/* fd in this process's table is the file DIR/name. */
static int fd_is(int fd, const char *name)
{
	char p[PATH_MAX + 64];
	struct stat a, b;
	path_of(name, p, sizeof(p));
	return fd >= 0 && fstat(fd, &a) == 0 && stat(p, &b) == 0 && a.st_ino == b.st_ino
	       && a.st_dev == b.st_dev;
}

static int open_new(const char *name)
{
	char p[PATH_MAX + 64];
	path_of(name, p, sizeof(p));
	return open(p, O_RDONLY | O_CREAT | O_CLOEXEC, 0644);
}

static void wait_go(void)
{
	while (!wl_go_exists())
		wl_nap();
}

static void report(const char *who)
{
	char name[32];
	snprintf(name, sizeof(name), "r.%s", who);
	wl_write_file(name, wl_nfail ? wl_failures : "PASS\n");
	_exit(0);
}

static void child_a(void)
{
	if (wait_number("shared.ok") < 0)
		wl_die("A: the root never opened shared.txt");
	wl_write_file("up.a", "1\n");
	wait_go();
	CHECK(fd_is(SHARED_FD, "shared.txt"), "A: fd %d is not shared.txt", SHARED_FD);
	long fd = wait_number("fd.root");
	CHECK(fd_is((int)fd, "probe.root"), "A: fd %ld opened by the root after go is not in "
	      "the shared table", fd);
	write_number("fd.a", open_new("probe.a"));
	report("a");
}

static void child_b(void)
{
	char want[PATH_MAX + 64], cwd[PATH_MAX];
	wl_write_file("up.b", "1\n");
	wait_go();
	CHECK_EQ("B: umask set by the root before the checkpoint", umask(022), 027);
	umask(027);
	if (wait_number("fs.root") < 0)
		wl_fail("B: the root never changed directory");
	path_of("fsdir", want, sizeof(want));
	CHECK(getcwd(cwd, sizeof(cwd)) && strcmp(cwd, want) == 0,
	      "B: cwd is %s, not the %s the root changed to", cwd, want);
	umask(077);
	write_number("fs.b", 1);
	report("b");
}

static void child_a2(void)
{
	char p[PATH_MAX + 64];
	path_of("a2.txt", p, sizeof(p));
	int fd = open(p, O_RDONLY | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0 || dup2(fd, A2_FD) < 0)
		wl_die("A2: open a2.txt");
	close(fd);
	pid_t a3 = raw_clone(CLONE_FILES | CLONE_PARENT);
	if (a3 < 0)
		wl_die("clone A3");
	if (a3 == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		wl_write_file("up.a3", "1\n");
		wait_go();
		CHECK(fd_is(A2_FD, "a2.txt"), "A3: fd %d is not a2.txt", A2_FD);
		write_number("fd.a3", open_new("probe.a3"));
		report("a3");
	}
	wl_write_file("up.a2", "1\n");
	wait_go();
	long fd3 = wait_number("fd.a3");
	CHECK(fd_is((int)fd3, "probe.a3"), "A2: fd %ld opened by A3 after go is not in the "
	      "shared table", fd3);
	report("a2");
}

static int child_c(void *arg)
{
	(void)arg;
	/* Shares the root's memory, TLS included: raw system calls and shared
	 * variables only, no verdict of its own. */
	int acked = 0;
	for (;;) {
		c_counter++;
		if (vm_value == MAGIC && !acked) {
			struct sigaction sa = { .sa_handler = on_usr2 };
			if (sigaction(SIGUSR2, &sa, NULL) == 0)
				vm_ack = 1;
			acked = 1;
		}
		if (vm_value == -1)
			syscall(SYS_exit, 0);
		wl_nap();
	}
	return 0;
}

static void wait_up(const char *name)
{
	for (int naps = 0; !exists(name); naps++) {
		if (naps > DEADLINE_NAPS)
			wl_die("%s never came up", name);
		wl_nap();
	}
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	char p[PATH_MAX + 64];
	path_of("fsdir", p, sizeof(p));
	SETUP(mkdir(p, 0755));
	umask(027);
	struct sigaction sa = { .sa_handler = on_usr1 };
	SETUP(sigaction(SIGUSR1, &sa, NULL));

	pid_t a = raw_clone(CLONE_FILES | SIGCHLD);
	SETUP(a);
	if (a == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		child_a();
	}
	pid_t b = raw_clone(CLONE_FS | SIGCHLD);
	SETUP(b);
	if (b == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		child_b();
	}
	pid_t c = clone(child_c, c_stack + sizeof(c_stack), CLONE_VM | CLONE_SIGHAND | SIGCHLD,
			NULL);
	SETUP(c);
	pid_t a2 = raw_clone(SIGCHLD);
	SETUP(a2);
	if (a2 == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		child_a2();
	}
	/* Opened once all are made: B, C and A2 have copies of the table, and
	 * a file description shared across tables is another matter. */
	path_of("shared.txt", p, sizeof(p));
	int fd = open(p, O_RDONLY | O_CREAT | O_CLOEXEC, 0644);
	SETUP(fd);
	SETUP(dup2(fd, SHARED_FD));
	SETUP(close(fd));
	wl_write_file("shared.ok", "1\n");
	wait_up("up.a");
	wait_up("up.b");
	wait_up("up.a2");
	wait_up("up.a3");
	while (c_counter == 0)
		wl_nap();
	wl_ready("a=%d\nb=%d\nc=%d\na2=%d\n", (int)a, (int)b, (int)c, (int)a2);
	wait_go();

	if (wl_sabotage)
		SETUP(unshare(CLONE_FILES | CLONE_FS));
	/* the fd table */
	write_number("fd.root", open_new("probe.root"));
	long fd_a = wait_number("fd.a");
	CHECK(fd_is((int)fd_a, "probe.a"), "root: fd %ld opened by A after go is not in the "
	      "shared table", fd_a);
	/* cwd and umask */
	path_of("fsdir", p, sizeof(p));
	CHECK_SYS(chdir(p));
	write_number("fs.root", 1);
	if (wait_number("fs.b") < 0)
		wl_fail("root: B never answered");
	mode_t mask = umask(027);
	CHECK_EQ("root: umask set by B", mask, 077);
	/* memory and signal handlers */
	unsigned long before = c_counter;
	vm_value = MAGIC;
	for (int naps = 0; !vm_ack && naps < DEADLINE_NAPS; naps++)
		wl_nap();
	CHECK(vm_ack, "root: C never saw the value written in shared memory");
	CHECK(c_counter > before, "root: C's counter stopped at %lu", before);
	struct sigaction now;
	CHECK_SYS(sigaction(SIGUSR2, NULL, &now));
	CHECK(now.sa_handler == on_usr2, "root: the SIGUSR2 handler C installed is not shared");
	CHECK_SYS(sigaction(SIGUSR1, NULL, &now));
	CHECK(now.sa_handler == on_usr1, "root: the SIGUSR1 handler was lost");
	vm_value = -1;
	/* the others' verdicts */
	static const char *const others[] = { "r.a", "r.b", "r.a2", "r.a3" };
	for (size_t i = 0; i < sizeof(others) / sizeof(others[0]); i++) {
		char buf[4096] = "";
		path_of(others[i], p, sizeof(p));
		int naps = 0;
		while (wl_read_file(p, buf, sizeof(buf)) <= 0 && naps++ < DEADLINE_NAPS)
			wl_nap();
		if (strncmp(buf, "PASS", 4) != 0)
			wl_fail("%s: %s", others[i] + 2, naps > DEADLINE_NAPS ? "no verdict" : buf);
	}
	int rc = wl_finish();
	while (waitpid(-1, NULL, __WALL) > 0)
		;
	return rc;
}
