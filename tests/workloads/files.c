/*
 * files.c - open files keep their number, flags, offset and identity across
 * checkpoint/restore.
 *
 * Checked, for every fd below: the /proc/self/fd link target, F_GETFL and F_GETFD
 * (exactly as at ready), the offset (lseek SEEK_CUR), and st_dev/st_ino (only
 * st_dev for the deleted file, whose inode is necessarily new after a kill):
 *   10  ro.txt        O_RDONLY                  offset 100
 *   11  append.log    O_WRONLY|O_APPEND         offset 3; a write after go lands at the end
 *   42  rw.dat        O_RDWR                    offset 4242
 *   43  dup of 42     the same open file description: moving 42 moves 43
 *   44  rw.dat again  O_RDONLY, its own description, offset 44
 *   200 cloexec.txt   O_RDONLY|O_CLOEXEC        offset 17, FD_CLOEXEC set
 *   201 nonblock.txt  O_RDWR|O_NONBLOCK         offset 7
 *   300 subdir/       O_RDONLY|O_DIRECTORY      openat() through it works
 *   13  deleted.txt   O_RDWR, unlinked          offset 5; st_nlink 0, content readable,
 *                                               link ends in " (deleted)"
 *   20  /dev/null  21 /dev/zero  22 /dev/random  23 /dev/urandom  (by st_rdev; they work)
 * plus the cwd (a directory inside DIR, relative opens work) and umask 027.
 * File locks, the same in /proc/self/fdinfo and really held (a child's fresh
 * opens of the files run into them):
 *   10  flock LOCK_SH          11  flock LOCK_EX
 *   42  POSIX write lock on bytes 100-149     44  POSIX read lock from 5000 to EOF
 *   200 OFD read lock on the whole file
 */
#include "wl.h"

#include <sys/file.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>

enum { FD_RO = 10, FD_APPEND = 11, FD_RW = 42, FD_RW_DUP = 43, FD_RW_OTHER = 44,
       FD_CLOEXEC_ = 200, FD_NONBLOCK = 201, FD_DIR = 300, FD_DELETED = 13,
       FD_NULL = 20, FD_ZERO = 21, FD_RANDOM = 22, FD_URANDOM = 23 };

struct fdspec {
	int fd;
	const char *name;       /* relative to DIR, or an absolute device path */
	int flags;
	off_t offset;           /* -1: leave it */
	/* recorded at ready */
	int fl, fdfl;
	off_t pos;
	dev_t dev;
	ino_t ino;
	char link[PATH_MAX];
};

static struct fdspec fds[] = {
	{ FD_RO, "ro.txt", O_RDONLY, 100 },
	{ FD_APPEND, "append.log", O_WRONLY | O_APPEND, 3 },
	{ FD_RW, "rw.dat", O_RDWR, 4242 },
	{ FD_RW_DUP, NULL, 0, -1 },             /* dup(FD_RW) */
	{ FD_RW_OTHER, "rw.dat", O_RDONLY, 44 },
	{ FD_CLOEXEC_, "cloexec.txt", O_RDONLY | O_CLOEXEC, 17 },
	{ FD_NONBLOCK, "nonblock.txt", O_RDWR | O_NONBLOCK, 7 },
	{ FD_DIR, "subdir", O_RDONLY | O_DIRECTORY, -1 },
	{ FD_DELETED, "deleted.txt", O_RDWR | O_CREAT, 5 },
	{ FD_NULL, "/dev/null", O_WRONLY, -1 },
	{ FD_ZERO, "/dev/zero", O_RDONLY, -1 },
	{ FD_RANDOM, "/dev/random", O_RDONLY, -1 },
	{ FD_URANDOM, "/dev/urandom", O_RDONLY, -1 },
};
#define NFDS (sizeof(fds) / sizeof(fds[0]))

static const char deleted_text[] = "this file was unlinked while open; its data must survive\n";
static const char inside_text[] = "reached through the directory fd\n";

static void make_file(const char *name, size_t size)
{
	char path[PATH_MAX + 64], buf[8192];
	snprintf(path, sizeof(path), "%s/%s", wl_dir, name);
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		wl_die("create %s", path);
	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = (char)('a' + (i * 7 + size) % 26);
	for (size_t done = 0; done < size; done += sizeof(buf))
		if (write(fd, buf, size - done < sizeof(buf) ? size - done : sizeof(buf)) < 0)
			wl_die("write %s", path);
	close(fd);
}

static void open_at_number(struct fdspec *s)
{
	int fd;
	if (!s->name) {
		fd = dup(FD_RW);
	} else {
		char path[PATH_MAX + 64];
		if (s->name[0] == '/')
			snprintf(path, sizeof(path), "%s", s->name);
		else
			snprintf(path, sizeof(path), "%s/%s", wl_dir, s->name);
		fd = open(path, s->flags, 0600);
	}
	if (fd < 0)
		wl_die("open %s", s->name ? s->name : "dup");
	if (dup3(fd, s->fd, s->flags & O_CLOEXEC) < 0)
		wl_die("dup3 to %d", s->fd);
	close(fd);
}

static void fd_link(int fd, char *out, size_t size)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(path, out, size - 1);
	out[n < 0 ? 0 : n] = '\0';
}

static void record(struct fdspec *s)
{
	struct stat st;
	if (fstat(s->fd, &st) < 0)
		wl_die("fstat %d", s->fd);
	s->fl = fcntl(s->fd, F_GETFL);
	s->fdfl = fcntl(s->fd, F_GETFD);
	s->pos = lseek(s->fd, 0, SEEK_CUR);
	s->dev = st.st_dev;
	s->ino = st.st_ino;
	fd_link(s->fd, s->link, sizeof(s->link));
}

static void check_same(const struct fdspec *s)
{
	struct stat st;
	char link[PATH_MAX];
	if (fstat(s->fd, &st) < 0) {
		wl_fail("fd %d: fstat: %s", s->fd, strerror(errno));
		return;
	}
	char what[64];
	snprintf(what, sizeof(what), "fd %d F_GETFL", s->fd);
	CHECK_EQ(what, fcntl(s->fd, F_GETFL), s->fl);
	snprintf(what, sizeof(what), "fd %d F_GETFD", s->fd);
	CHECK_EQ(what, fcntl(s->fd, F_GETFD), s->fdfl);
	snprintf(what, sizeof(what), "fd %d offset", s->fd);
	if (s->fd != FD_DIR)   /* a directory's offset is a readdir cookie */
		CHECK_EQ(what, lseek(s->fd, 0, SEEK_CUR), s->pos);
	/* A deleted file cannot keep its inode across a kill: the inode is freed
	 * with its last opener, and a restore recreates the contents in a new one
	 * on the same file system. Its contents are checked separately. */
	ino_t want_ino = s->fd == FD_DELETED ? st.st_ino : s->ino;
	CHECK(st.st_dev == s->dev && st.st_ino == want_ino, "fd %d: now dev %#lx ino %lu, was %#lx %lu",
	      s->fd, (unsigned long)st.st_dev, (unsigned long)st.st_ino,
	      (unsigned long)s->dev, (unsigned long)s->ino);
	fd_link(s->fd, link, sizeof(link));
	CHECK(strcmp(link, s->link) == 0, "fd %d: link was '%s', now '%s'", s->fd, s->link, link);
}

static const int locked_fds[] = { FD_RO, FD_APPEND, FD_RW, FD_RW_OTHER, FD_CLOEXEC_ };
#define NLOCKED (sizeof(locked_fds) / sizeof(locked_fds[0]))
static char lock_lines[NLOCKED][512];

/* The "lock:" lines of an fd's fdinfo, without their running numbers. */
static void fd_locks(int fd, char *out, size_t size)
{
	char path[64], text[4096];
	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
	out[0] = '\0';
	int in = open(path, O_RDONLY);
	ssize_t n = in < 0 ? -1 : read(in, text, sizeof(text) - 1);
	if (in >= 0)
		close(in);
	text[n < 0 ? 0 : n] = '\0';
	for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
		if (strncmp(line, "lock:", 5) != 0)
			continue;
		char *rest = strchr(line, ':');
		rest = rest ? strchr(rest + 1, ':') : NULL;     /* after "lock:\tN:" */
		if (rest && strlen(out) + strlen(rest) + 2 < size) {
			strcat(out, rest + 1);
			strcat(out, ";");
		}
	}
}

static void set_lock(int fd, int cmd, short type, off_t start, off_t len)
{
	struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len };
	if (fcntl(fd, cmd, &fl) < 0)
		wl_die("lock fd %d", fd);
}

/* From a child with descriptions of its own: the locks are really held. */
static void check_locks_held(void)
{
	pid_t me = getpid();
	pid_t child = fork();
	if (child < 0) {
		wl_fail("fork: %s", strerror(errno));
		return;
	}
	if (child == 0) {
		char p[PATH_MAX + 64];
		int bad = 0;
		snprintf(p, sizeof(p), "%s/ro.txt", wl_dir);
		int ro = open(p, O_RDONLY);
		if (ro < 0 || flock(ro, LOCK_EX | LOCK_NB) == 0 || errno != EWOULDBLOCK)
			bad |= 1;
		snprintf(p, sizeof(p), "%s/append.log", wl_dir);
		int ap = open(p, O_RDONLY);
		if (ap < 0 || flock(ap, LOCK_SH | LOCK_NB) == 0 || errno != EWOULDBLOCK)
			bad |= 2;
		snprintf(p, sizeof(p), "%s/rw.dat", wl_dir);
		int rw = open(p, O_RDWR);
		struct flock fl = { .l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 120, .l_len = 1 };
		if (rw < 0 || fcntl(rw, F_GETLK, &fl) < 0 || fl.l_type != F_WRLCK || fl.l_pid != me)
			bad |= 4;
		struct flock fw = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 9000, .l_len = 1 };
		if (rw < 0 || fcntl(rw, F_GETLK, &fw) < 0 || fw.l_type != F_RDLCK || fw.l_pid != me)
			bad |= 8;
		snprintf(p, sizeof(p), "%s/cloexec.txt", wl_dir);
		int ce = open(p, O_RDWR);
		struct flock fo = { .l_type = F_WRLCK, .l_whence = SEEK_SET };
		if (ce < 0 || fcntl(ce, F_OFD_GETLK, &fo) < 0 || fo.l_type != F_RDLCK)
			bad |= 16;
		_exit(bad);
	}
	int status = 0;
	if (waitpid(child, &status, 0) != child || !WIFEXITED(status)) {
		wl_fail("lock checker did not exit (status %#x)", status);
		return;
	}
	int bad = WEXITSTATUS(status);
	CHECK(!(bad & 1), "flock LOCK_SH on fd %d is not held", FD_RO);
	CHECK(!(bad & 2), "flock LOCK_EX on fd %d is not held", FD_APPEND);
	CHECK(!(bad & 4), "POSIX write lock on rw.dat 100-149 is not held");
	CHECK(!(bad & 8), "POSIX read lock on rw.dat from 5000 is not held");
	CHECK(!(bad & 16), "OFD read lock on cloexec.txt is not held");
}

static void check_device(int fd, unsigned maj, unsigned min, const char *name)
{
	struct stat st;
	if (fstat(fd, &st) < 0 || !S_ISCHR(st.st_mode) || major(st.st_rdev) != maj ||
	    minor(st.st_rdev) != min)
		wl_fail("fd %d is not %s (%u:%u)", fd, name, maj, min);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);

	make_file("ro.txt", 1000);
	make_file("append.log", 50);
	make_file("rw.dat", 10000);
	make_file("cloexec.txt", 100);
	make_file("nonblock.txt", 100);
	char path[PATH_MAX + 64];
	snprintf(path, sizeof(path), "%s/subdir", wl_dir);
	SETUP(mkdir(path, 0755));
	snprintf(path, sizeof(path), "%s/subdir/inside.txt", wl_dir);
	int in_fd = open(path, O_WRONLY | O_CREAT, 0644);
	SETUP(in_fd);
	SETUP(write(in_fd, inside_text, strlen(inside_text)));
	close(in_fd);

	for (size_t i = 0; i < NFDS; i++)
		open_at_number(&fds[i]);
	SETUP(write(FD_DELETED, deleted_text, strlen(deleted_text)));
	snprintf(path, sizeof(path), "%s/deleted.txt", wl_dir);
	SETUP(unlink(path));
	for (size_t i = 0; i < NFDS; i++)
		if (fds[i].offset >= 0)
			SETUP(lseek(fds[i].fd, fds[i].offset, SEEK_SET));

	char cwd[PATH_MAX + 64], cwd_now[PATH_MAX + 64] = "";
	snprintf(cwd, sizeof(cwd), "%s/cwd-here", wl_dir);
	SETUP(mkdir(cwd, 0755));
	SETUP(chdir(cwd));
	int marker = open("marker", O_WRONLY | O_CREAT, 0644);
	SETUP(marker);
	close(marker);
	umask(027);

	SETUP(flock(FD_RO, LOCK_SH));
	SETUP(flock(FD_APPEND, LOCK_EX));
	set_lock(FD_RW, F_SETLK, F_WRLCK, 100, 50);
	set_lock(FD_RW_OTHER, F_SETLK, F_RDLCK, 5000, 0);
	set_lock(FD_CLOEXEC_, F_OFD_SETLK, F_RDLCK, 0, 0);
	for (size_t i = 0; i < NLOCKED; i++)
		fd_locks(locked_fds[i], lock_lines[i], sizeof(lock_lines[i]));

	for (size_t i = 0; i < NFDS; i++)
		record(&fds[i]);
	wl_ready("cwd=%s\nfds=10,11,13,20,21,22,23,42,43,44,200,201,300\n", cwd);
	wl_wait_go(NULL);

	if (wl_sabotage)
		lseek(FD_RW, 1, SEEK_SET);

	for (size_t i = 0; i < NFDS; i++)
		check_same(&fds[i]);

	for (size_t i = 0; i < NLOCKED; i++) {
		char now[512];
		fd_locks(locked_fds[i], now, sizeof(now));
		CHECK(lock_lines[i][0] && strcmp(now, lock_lines[i]) == 0,
		      "fd %d locks were '%s', now '%s'", locked_fds[i], lock_lines[i], now);
	}
	check_locks_held();

	/* The flags asked for are really there (not only "the same as before"). */
	CHECK((fcntl(FD_APPEND, F_GETFL) & (O_ACCMODE | O_APPEND)) == (O_WRONLY | O_APPEND),
	      "fd %d lost O_WRONLY|O_APPEND", FD_APPEND);
	CHECK(fcntl(FD_CLOEXEC_, F_GETFD) & FD_CLOEXEC, "fd %d lost FD_CLOEXEC", FD_CLOEXEC_);
	CHECK(!(fcntl(FD_RW, F_GETFD) & FD_CLOEXEC), "fd %d gained FD_CLOEXEC", FD_RW);
	CHECK(fcntl(FD_NONBLOCK, F_GETFL) & O_NONBLOCK, "fd %d lost O_NONBLOCK", FD_NONBLOCK);
	CHECK((fcntl(FD_RW, F_GETFL) & O_ACCMODE) == O_RDWR, "fd %d is not O_RDWR", FD_RW);

	/* 42 and 43 share one description; 44 is its own. */
	if (lseek(FD_RW, 1000, SEEK_SET) == 1000) {
		CHECK_EQ("offset of fd 43 after moving fd 42 (dup: shared)", lseek(FD_RW_DUP, 0, SEEK_CUR), 1000);
		CHECK_EQ("offset of fd 44 after moving fd 42 (separate open)", lseek(FD_RW_OTHER, 0, SEEK_CUR), 44);
	}
	char buf[256];
	CHECK(pread(FD_RO, buf, 10, 100) == 10 && buf[0] == (char)('a' + (100 * 7 + 1000) % 26),
	      "ro.txt content at offset 100 is wrong");

	/* O_APPEND: a write lands at the end whatever the offset says. */
	struct stat st;
	CHECK_SYS(fstat(FD_APPEND, &st));
	static const char tail[] = "after-go\n";
	if (write(FD_APPEND, tail, strlen(tail)) != (ssize_t)strlen(tail)) {
		wl_fail("write to append.log after go: %s", strerror(errno));
	} else {
		snprintf(path, sizeof(path), "%s/append.log", wl_dir);
		int rd = open(path, O_RDONLY);
		CHECK(rd >= 0 && pread(rd, buf, strlen(tail), st.st_size) == (ssize_t)strlen(tail) &&
		      memcmp(buf, tail, strlen(tail)) == 0, "append.log: the write after go is not at the end");
		CHECK_EQ("append.log offset after the write", lseek(FD_APPEND, 0, SEEK_CUR),
			 st.st_size + (off_t)strlen(tail));
		if (rd >= 0)
			close(rd);
	}

	/* The unlinked file */
	CHECK_SYS(fstat(FD_DELETED, &st));
	CHECK_EQ("deleted.txt st_nlink", st.st_nlink, 0);
	memset(buf, 0, sizeof(buf));
	CHECK(pread(FD_DELETED, buf, sizeof(buf), 0) == (ssize_t)strlen(deleted_text) &&
	      strcmp(buf, deleted_text) == 0, "deleted.txt content changed: '%.60s'", buf);
	char link[PATH_MAX];
	fd_link(FD_DELETED, link, sizeof(link));
	size_t ll = strlen(link);
	CHECK(ll > 10 && strcmp(link + ll - 10, " (deleted)") == 0, "fd %d link: '%s'", FD_DELETED, link);

	/* The directory fd */
	int in = openat(FD_DIR, "inside.txt", O_RDONLY);
	memset(buf, 0, sizeof(buf));
	CHECK(in >= 0 && read(in, buf, sizeof(buf)) == (ssize_t)strlen(inside_text) &&
	      strcmp(buf, inside_text) == 0, "openat(fd %d, inside.txt) failed", FD_DIR);
	if (in >= 0)
		close(in);

	/* Devices */
	check_device(FD_NULL, 1, 3, "/dev/null");
	check_device(FD_ZERO, 1, 5, "/dev/zero");
	check_device(FD_RANDOM, 1, 8, "/dev/random");
	check_device(FD_URANDOM, 1, 9, "/dev/urandom");
	CHECK(write(FD_NULL, "x", 1) == 1, "/dev/null refused a write");
	memset(buf, 0xff, 64);
	CHECK(read(FD_ZERO, buf, 64) == 64 && buf[0] == 0 && buf[63] == 0, "/dev/zero did not give zeros");
	memset(buf, 0, 64);
	CHECK(read(FD_URANDOM, buf, 64) == 64, "/dev/urandom read failed");
	int nonzero = 0;
	for (int i = 0; i < 64; i++)
		nonzero += buf[i] != 0;
	CHECK(nonzero > 8, "/dev/urandom gave %d non-zero bytes of 64", nonzero);
	CHECK(read(FD_RANDOM, buf, 16) == 16, "/dev/random read failed");

	/* cwd and umask */
	CHECK(getcwd(cwd_now, sizeof(cwd_now)) && strcmp(cwd_now, cwd) == 0, "cwd was %s, now %s", cwd, cwd_now);
	CHECK(access("marker", F_OK) == 0, "relative path 'marker' not found from the cwd");
	mode_t old = umask(022);
	umask(old);
	CHECK_EQ("umask", old, 027);
	return wl_finish();
}
