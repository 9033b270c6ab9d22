/*
 * sharing.c - memory and open file descriptions shared across fork, by a
 * parent, its child and its grandchild.
 *
 * Memory (all MAP_SHARED|MAP_ANONYMOUS, mapped before the forks):
 *   big    8 MiB: the parent writes pages 0-511, the child pages 1024-1535
 *          (pages only the child touched), the rest stays untouched; the
 *          last page holds the flags the three talk through.
 *   part   an object of 4 MiB of which the first MiB was unmapped (the
 *          mapping starts at offset 1 MiB): the parent writes its first MiB,
 *          the child its last.
 *   split  a 1 MiB object with one page unmapped in the middle: two VMAs of
 *          one object in each process; the parent writes the first, the
 *          child the second but its last page.
 *   priv   2 MiB of private memory the parent filled before the forks and
 *          nobody wrote since: the same physical pages in all three (the
 *          dump reports them as stored twice, cow_shared_bytes).
 * Files (opened before the forks, so one description each, one offset):
 *   shared.dat  the parent writes 100 bytes, the child 50 more (offset 150)
 *   append.log  O_APPEND, each writes a line
 *   /dev/null   its status flags (O_NONBLOCK) belong to the description
 *   gone.dat    written, then unlinked: a deleted file, shared
 *   DIR         a directory
 * After go, every process checks every pattern, the untouched pages, the
 * offset (150, before anyone moves it), and with kcmp that its fds are its parent's descriptions; then
 * in turn (through the flags page, with timeouts) the parent writes 10
 * bytes and sets O_NONBLOCK, the child sees offset 160 and the flag, seeks
 * to 1000, appends, writes into part and split; the grandchild sees 1000,
 * seeks to 2000; the parent sees 2000, the child's writes in memory and the
 * append offset at the end of the log. Children write r.child/r.grandchild.
 * WL_SABOTAGE: the child reopens shared.dat at the same fd after go (its own
 * offset: the sharing is broken).
 */
#include "wl.h"

#include <signal.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#define PAGE 4096UL
#define BIG_PAGES 2048UL
#define PART_SIZE (4UL << 20)
#define PART_CUT (1UL << 20)
#define SPLIT_PAGES 256UL
#define SPLIT_HOLE 64UL
#define WAIT_NAPS 500            /* 5 s for the others to take their turn */
#define SYS_KCMP_NR 312
#define KCMP_FILE_KIND 0

enum { F_READY, F_CHECKED, F_PARENT_DONE, F_CHILD_DONE, F_GRANDCHILD_DONE, NFLAGS };

#define PRIV_SIZE (2UL << 20)

static unsigned char *big, *part, *split, *priv;
static _Atomic long *flags;
static int fd_file, fd_append, fd_null, fd_gone, fd_dir;
static const char *who = "parent";

static uint64_t word_at(uint64_t seed, size_t i)
{
	return (seed + i) * 0x9E3779B97F4A7C15ULL ^ 0x5DEECE66DULL;
}

static void fill(unsigned char *at, size_t len, uint64_t seed)
{
	uint64_t *w = (uint64_t *)at;
	for (size_t i = 0; i < len / 8; i++)
		w[i] = word_at(seed, i);
}

static void check_fill(const char *what, const unsigned char *at, size_t len, uint64_t seed)
{
	const uint64_t *w = (const uint64_t *)at;
	for (size_t i = 0; i < len / 8; i++)
		if (w[i] != word_at(seed, i)) {
			wl_fail("%s: %s: word %zu is %#llx, want %#llx", who, what, i,
				(unsigned long long)w[i], (unsigned long long)word_at(seed, i));
			return;
		}
}

static void check_zero(const char *what, const unsigned char *at, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (at[i]) {
			wl_fail("%s: %s: byte %zu is %#x, want 0", who, what, i, at[i]);
			return;
		}
}

static int wait_flag(int which, long want)
{
	for (int n = 0; n < WAIT_NAPS; n++) {
		if (atomic_load(&flags[which]) >= want)
			return 1;
		wl_nap();
	}
	return 0;
}

static long pos_of(int fd)
{
	return (long)lseek(fd, 0, SEEK_CUR);
}

static void check_same_files(void)
{
	int fds[] = { fd_file, fd_append, fd_null, fd_gone, fd_dir };
	for (int i = 0; i < 5; i++) {
		long r = syscall(SYS_KCMP_NR, getpid(), getppid(), KCMP_FILE_KIND, fds[i], fds[i]);
		CHECK(r == 0, "%s: fd %d is not its parent's open file description (kcmp %ld: %s)",
		      who, fds[i], r, r < 0 ? strerror(errno) : "different");
	}
}

static void check_all_data(void)
{
	check_fill("big, the parent's pages", big, 512 * PAGE, 1);
	check_zero("big, untouched pages", big + 512 * PAGE, 512 * PAGE);
	check_fill("big, the child's pages", big + 1024 * PAGE, 512 * PAGE, 2);
	check_zero("big, untouched pages at the end", big + 1536 * PAGE, 511 * PAGE);
	check_fill("part, the parent's MiB", part, PART_CUT, 3);
	check_fill("part, the child's MiB", part + PART_SIZE - PART_CUT - PART_CUT, PART_CUT, 4);
	check_fill("split, first VMA", split, SPLIT_HOLE * PAGE, 5);
	check_fill("priv", priv, PRIV_SIZE, 7);
	check_fill("split, second VMA", split + (SPLIT_HOLE + 1) * PAGE,
		   (SPLIT_PAGES - SPLIT_HOLE - 2) * PAGE, 6);
	char buf[16] = { 0 };
	CHECK(pread(fd_gone, buf, 9, 0) == 9 && memcmp(buf, "was here\n", 9) == 0,
	      "%s: the deleted file lost its contents (%.9s)", who, buf);
}

static void finish_and_exit(const char *name)
{
	wl_write_file(name, wl_nfail ? wl_failures : "PASS\n");
	_exit(wl_nfail ? 1 : 0);
}

static void grandchild(void)
{
	who = "grandchild";
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	atomic_fetch_add(&flags[F_READY], 1);
	while (!wl_go_exists())
		wl_nap();
	check_all_data();
	check_same_files();
	CHECK_EQ("grandchild: shared.dat offset", pos_of(fd_file), 150);
	atomic_fetch_add(&flags[F_CHECKED], 1);
	if (!wait_flag(F_CHILD_DONE, 1))
		wl_fail("grandchild: the child's flag never came through the shared memory");
	CHECK_EQ("grandchild: shared.dat offset after the child's lseek", pos_of(fd_file), 1000);
	lseek(fd_file, 2000, SEEK_SET);
	atomic_store(&flags[F_GRANDCHILD_DONE], 1);
	finish_and_exit("r.grandchild");
}

static void child(void)
{
	who = "child";
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	fill(big + 1024 * PAGE, 512 * PAGE, 2);
	fill(part + PART_SIZE - PART_CUT - PART_CUT, PART_CUT, 4);
	fill(split + (SPLIT_HOLE + 1) * PAGE, (SPLIT_PAGES - SPLIT_HOLE - 2) * PAGE, 6);
	char fifty[50];
	memset(fifty, 'c', sizeof(fifty));
	if (write(fd_file, fifty, sizeof(fifty)) != 50 || write(fd_append, "child\n", 6) != 6)
		_exit(3);
	pid_t g = fork();
	if (g < 0)
		_exit(4);
	if (g == 0)
		grandchild();
	atomic_fetch_add(&flags[F_READY], 1);
	while (!wl_go_exists())
		wl_nap();
	if (wl_sabotage) {
		int again = open("shared.dat", O_RDWR | O_CLOEXEC);
		lseek(again, 150, SEEK_SET);
		dup2(again, fd_file);
		close(again);
	}
	check_all_data();
	check_same_files();
	CHECK_EQ("child: shared.dat offset", pos_of(fd_file), 150);
	atomic_fetch_add(&flags[F_CHECKED], 1);
	if (!wait_flag(F_PARENT_DONE, 1))
		wl_fail("child: the parent's flag never came through the shared memory");
	CHECK_EQ("child: shared.dat offset after the parent's write", pos_of(fd_file), 160);
	CHECK(fcntl(fd_null, F_GETFL) & O_NONBLOCK,
	      "child: O_NONBLOCK set by the parent on /dev/null is not seen");
	lseek(fd_file, 1000, SEEK_SET);
	CHECK_SYS(write(fd_append, "child again\n", 12));
	part[PART_CUT + 17] = 0xC1;
	split[(SPLIT_PAGES - 1) * PAGE + 17] = 0xC2;
	atomic_store(&flags[F_CHILD_DONE], 1);
	int status;
	while (waitpid(g, &status, 0) < 0 && errno == EINTR)
		;
	finish_and_exit("r.child");
}

static void *map_shared(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		wl_die("mmap of %zu bytes", len);
	return p;
}

static void report(const char *name, const char *what)
{
	char path[PATH_MAX + 64], text[8192];
	snprintf(path, sizeof(path), "%s/%s", wl_dir, name);
	if (wl_read_file(path, text, sizeof(text)) < 0)
		wl_fail("%s wrote no verdict", what);
	else if (strcmp(text, "PASS\n") != 0)
		wl_fail("%s said:\n%s", what, text);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	if (chdir(wl_dir) < 0)
		wl_die("chdir");
	big = map_shared(BIG_PAGES * PAGE);
	flags = (_Atomic long *)(big + (BIG_PAGES - 1) * PAGE);
	unsigned char *whole = map_shared(PART_SIZE);
	SETUP(munmap(whole, PART_CUT));
	part = whole + PART_CUT;
	split = map_shared(SPLIT_PAGES * PAGE);
	SETUP(munmap(split + SPLIT_HOLE * PAGE, PAGE));
	priv = mmap(NULL, PRIV_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (priv == MAP_FAILED)
		wl_die("mmap priv");
	fill(priv, PRIV_SIZE, 7);
	fill(big, 512 * PAGE, 1);
	fill(part, PART_CUT, 3);
	fill(split, SPLIT_HOLE * PAGE, 5);

	SETUP(fd_file = open("shared.dat", O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
	SETUP(fd_append = open("append.log", O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644));
	SETUP(fd_null = open("/dev/null", O_RDWR));
	SETUP(fd_gone = open("gone.dat", O_RDWR | O_CREAT | O_TRUNC, 0600));
	SETUP(fd_dir = open(".", O_RDONLY | O_DIRECTORY));
	char hundred[100];
	memset(hundred, 'p', sizeof(hundred));
	if (write(fd_file, hundred, 100) != 100 || write(fd_append, "parent\n", 7) != 7
	    || write(fd_gone, "was here\n", 9) != 9)
		wl_die("write");
	SETUP(unlink("gone.dat"));

	pid_t c = fork();
	if (c < 0)
		wl_die("fork");
	if (c == 0)
		child();
	if (!wait_flag(F_READY, 2))
		wl_die("the child and grandchild did not get ready");
	wl_ready("child=%d\nbig=%p\npart=%p\nsplit=%p\npriv=%p\n", c, (void *)big,
		 (void *)part, (void *)split, (void *)priv);
	wl_wait_go(NULL);

	check_all_data();
	CHECK_EQ("parent: shared.dat offset", pos_of(fd_file), 150);
	/* The others check the offset first: only then does it move. */
	if (!wait_flag(F_CHECKED, 2))
		wl_fail("parent: the others' checks never came through the shared memory");
	CHECK_SYS(write(fd_file, hundred, 10));
	CHECK_SYS(fcntl(fd_null, F_SETFL, fcntl(fd_null, F_GETFL) | O_NONBLOCK));
	atomic_store(&flags[F_PARENT_DONE], 1);
	if (!wait_flag(F_GRANDCHILD_DONE, 1))
		wl_fail("parent: the grandchild's flag never came through the shared memory");
	CHECK_EQ("parent: shared.dat offset after the grandchild's lseek", pos_of(fd_file), 2000);
	CHECK_EQ("parent: the child's write into part", part[PART_CUT + 17], 0xC1);
	CHECK_EQ("parent: the child's write into split", split[(SPLIT_PAGES - 1) * PAGE + 17], 0xC2);
	struct stat st;
	CHECK_SYS(fstat(fd_append, &st));
	CHECK_EQ("parent: append.log offset (the child appended)", pos_of(fd_append), st.st_size);
	int status;
	while (waitpid(c, &status, 0) < 0 && errno == EINTR)
		;
	report("r.child", "the child");
	report("r.grandchild", "the grandchild");
	return wl_finish();
}
