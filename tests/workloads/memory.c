/*
 * memory.c - every kind of memory a process has survives checkpoint/restore.
 *
 * Each region is filled with a pattern derived from its name, so a page restored
 * into the wrong place shows up as a mismatch. For every region, how
 * /proc/self/maps covers it (perms, file offset, device, inode, name: all of it
 * mapped, one kind) and the smaps VmFlags seen at ready must be identical after go.
 *
 * Checked:
 *   - heap: 200 small mallocs (brk heap) and one 8 MiB malloc (its own mmap)
 *   - brk: extended by sbrk and filled; sbrk(0) unchanged; sbrk(4096) still works
 *   - private anonymous mmap (4 MiB)
 *   - a sparse region where only every third page was touched: holes read as zero
 *   - MAP_GROWSDOWN region (VmFlags gd)
 *   - PROT_NONE: a standalone reservation and a guard page splitting an RW mapping
 *   - read-only and read+exec anonymous regions (the exec one is called after go)
 *   - private file mapping: pages written (copy-on-write) keep the writes, a page
 *     only read and pages never touched equal the file, and a never-touched page
 *     still follows the file (written after go): it must not become an anon copy
 *   - shared file mapping at a non-zero offset: a write through it after go is
 *     seen by pread, a pwrite is seen through it
 *   - MADV_DONTFORK (dc), MADV_DONTDUMP (dd), MADV_HUGEPAGE (hg) regions
 *   - a 32 KiB array in main's stack frame
 *   - /proc/self/cmdline and /proc/self/environ
 *   - 64 MiB of pseudo-random data (regenerated from the seed to compare)
 *
 * No malloc after setup: glibc could move the break, which is checked.
 */
#include "wl.h"

#include <sys/mman.h>

#define SMALL_ALLOCS 200
#define BIG_MIB 64

enum { PAGE = 4096 };

struct region {
	const char *name;
	uint8_t *addr;
	size_t len;
	char maps[512];      /* describe_range() at ready */
	char vmflags[256];
};

static char g_maps[1 << 20], g_smaps[4 << 20];
static char g_cmdline[65536], g_environ[65536], g_buf[65536];
static ssize_t g_cmdline_len, g_environ_len;
static struct region g_regions[32];
static int g_nregions;
static uint8_t *g_small[SMALL_ALLOCS];

static uint64_t seed_of(const char *name)
{
	uint64_t h = 0xcbf29ce484222325ULL;   /* FNV-1a */
	for (; *name; name++)
		h = (h ^ (uint8_t)*name) * 0x100000001b3ULL;
	return h | 1;
}

static void fill(uint8_t *p, size_t len, const char *name)
{
	uint64_t s = seed_of(name);
	for (size_t i = 0; i < len; i += 8) {
		uint64_t v = wl_xorshift(&s);
		memcpy(p + i, &v, len - i < 8 ? len - i : 8);
	}
}

static void check_fill(const uint8_t *p, size_t len, const char *name)
{
	uint64_t s = seed_of(name);
	for (size_t i = 0; i < len; i += 8) {
		uint64_t v = wl_xorshift(&s);
		if (memcmp(p + i, &v, len - i < 8 ? len - i : 8) != 0) {
			wl_fail("%s: content differs at offset %#zx (address %p)", name, i, (void *)(p + i));
			return;
		}
	}
}

static void check_zero(const uint8_t *p, size_t len, const char *what)
{
	for (size_t i = 0; i < len; i++)
		if (p[i]) {
			wl_fail("%s: byte at offset %#zx is %#x, want 0", what, i, p[i]);
			return;
		}
}

/* How /proc/self/maps covers [addr, addr + len): "perms offset dev inode path",
 * with the file offset taken at addr. Every mapping across the range must agree,
 * else out says where it changes. VMA boundaries themselves are not compared: the
 * kernel may merge or split neighbours differently after a restore, harmlessly. */
static void describe_range(const void *addr, size_t len, char *out, size_t size)
{
	uintptr_t cur = (uintptr_t)addr, stop = cur + len;
	out[0] = '\0';
	while (cur < stop) {
		char desc[512] = "";
		unsigned long start = 0, end = 0;
		for (char *line = g_maps; *line;) {
			char *nl = strchr(line, '\n');
			size_t n = nl ? (size_t)(nl - line) : strlen(line);
			char perms[8], dev[16];
			unsigned long off, ino;
			int pos = 0;
			if (sscanf(line, "%lx-%lx %7s %lx %15s %lu %n", &start, &end, perms, &off, dev, &ino,
				   &pos) == 6 && start <= cur && cur < end) {
				unsigned long off_at_addr = ino ? off - (start - (uintptr_t)addr) : 0;
				/* no path: " %n" skipped the newline and went on into the next line */
				int path_len = (size_t)pos <= n ? (int)(n - (size_t)pos) : 0;
				snprintf(desc, sizeof(desc), "%s %08lx %s %lu %.*s", perms, off_at_addr, dev, ino,
					 path_len, line + pos);
				break;
			}
			line += n + (nl != NULL);
		}
		if (!desc[0]) {
			snprintf(out, size, "unmapped at %#lx", (unsigned long)cur);
			return;
		}
		if (!out[0]) {
			snprintf(out, size, "%s", desc);
		} else if (strcmp(out, desc) != 0) {
			snprintf(out + strlen(out), size - strlen(out), " / at %#lx: %s", (unsigned long)cur, desc);
			return;
		}
		cur = end;
	}
}

/* Copy the VmFlags of the smaps entry that contains addr. */
static void vmflags_of(const void *addr, char *out, size_t size)
{
	uintptr_t a = (uintptr_t)addr;
	int inside = 0;
	out[0] = '\0';
	for (char *line = g_smaps; *line;) {
		char *nl = strchr(line, '\n');
		size_t n = nl ? (size_t)(nl - line) : strlen(line);
		unsigned long start, end;
		char c;
		if (sscanf(line, "%lx-%lx %c", &start, &end, &c) == 3)
			inside = start <= a && a < end;
		else if (inside && strncmp(line, "VmFlags:", 8) == 0) {
			snprintf(out, size, "%.*s", (int)(n - 8), line + 8);
			/* "ac" (VM_ACCOUNT) is commit accounting, invisible to the program:
			 * a PROT_NONE page that was once writable has it, a restore may not. */
			char *ac = strstr(out, " ac");
			if (ac && (ac[3] == ' ' || ac[3] == '\0'))
				memmove(ac, ac + 3, strlen(ac + 3) + 1);
			return;
		}
		line += n + (nl != NULL);
	}
}

static void read_layout(void)
{
	if (wl_read_file("/proc/self/maps", g_maps, sizeof(g_maps)) < 0 ||
	    wl_read_file("/proc/self/smaps", g_smaps, sizeof(g_smaps)) < 0)
		wl_fail("cannot read /proc/self/maps or smaps: %s", strerror(errno));
}

static struct region *add_region(const char *name, void *addr, size_t len)
{
	struct region *r = &g_regions[g_nregions++];
	r->name = name;
	r->addr = addr;
	r->len = len;
	return r;
}

static uint8_t *map_anon(size_t len, int prot, int extra_flags)
{
	void *p = mmap(NULL, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | extra_flags, -1, 0);
	if (p == MAP_FAILED)
		wl_die("mmap %zu bytes", len);
	return p;
}

static int make_file(const char *name, size_t pages, char *path, size_t size)
{
	snprintf(path, size, "%s/%s", wl_dir, name);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		wl_die("create %s", path);
	static uint8_t page[PAGE];
	for (size_t i = 0; i < pages; i++) {
		memset(page, 0x40 + (int)i, PAGE);
		if (pwrite(fd, page, PAGE, (off_t)(i * PAGE)) != PAGE)
			wl_die("write %s", path);
	}
	return fd;
}

/* Private file mapping: which pages are written and which are only read. */
#define PRIV_PAGES 16
static const int priv_written[] = { 1, 5, 6 };
#define PRIV_READ_PAGE 2
#define PRIV_LATE_PAGE 9    /* never touched; the file changes under it after go */
static const char *const priv_names[] = { "private[1]", "private[5]", "private[6]" };

static int is_written(int page)
{
	for (size_t i = 0; i < sizeof(priv_written) / sizeof(priv_written[0]); i++)
		if (priv_written[i] == page)
			return 1;
	return 0;
}

static void check_private_file(uint8_t *map, int fd)
{
	static uint8_t page[PAGE];
	for (int i = 0; i < PRIV_PAGES; i++) {
		if (pread(fd, page, PAGE, (off_t)i * PAGE) != PAGE) {
			wl_fail("pread private.dat page %d: %s", i, strerror(errno));
			return;
		}
		for (int j = 0; j < PAGE; j++)
			if (page[j] != 0x40 + i) {
				wl_fail("private.dat page %d on disk changed: a private write leaked", i);
				break;
			}
		if (!is_written(i) && memcmp(map + (size_t)i * PAGE, page, PAGE) != 0)
			wl_fail("private mapping page %d differs from the file", i);
	}
	for (size_t k = 0; k < sizeof(priv_written) / sizeof(priv_written[0]); k++)
		check_fill(map + (size_t)priv_written[k] * PAGE, PAGE, priv_names[k]);

	/* A page never touched is still the file's page: a change to the file shows. */
	memset(page, 0x99, PAGE);
	if (pwrite(fd, page, PAGE, (off_t)PRIV_LATE_PAGE * PAGE) != PAGE)
		wl_fail("pwrite private.dat: %s", strerror(errno));
	else if (memcmp(map + (size_t)PRIV_LATE_PAGE * PAGE, page, PAGE) != 0)
		wl_fail("private mapping page %d (never touched) no longer follows the file: "
			"restored as an anonymous copy?", PRIV_LATE_PAGE);
}

#define SHARED_FILE_PAGES 10
#define SHARED_OFFSET_PAGES 2
#define SHARED_PAGES 8

static void check_shared_file(uint8_t *map, int fd)
{
	static uint8_t page[SHARED_PAGES * PAGE];
	check_fill(map, SHARED_PAGES * PAGE, "shared");
	if (pread(fd, page, sizeof(page), SHARED_OFFSET_PAGES * PAGE) != (ssize_t)sizeof(page))
		wl_fail("pread shared.dat: %s", strerror(errno));
	else if (memcmp(page, map, sizeof(page)) != 0)
		wl_fail("shared.dat differs from its MAP_SHARED mapping");
	map[3 * PAGE + 7] ^= 0xff;
	uint8_t b;
	if (pread(fd, &b, 1, (SHARED_OFFSET_PAGES + 3) * PAGE + 7) != 1 || b != map[3 * PAGE + 7])
		wl_fail("a write through the MAP_SHARED mapping after go does not reach the file");
	b = 0x5a;
	if (pwrite(fd, &b, 1, (SHARED_OFFSET_PAGES + 4) * PAGE) != 1 || map[4 * PAGE] != 0x5a)
		wl_fail("a pwrite to shared.dat after go does not show in the MAP_SHARED mapping");
}

static void check_vmflag(const struct region *r, const char *flag)
{
	char want[8];
	snprintf(want, sizeof(want), " %s", flag);
	CHECK(strstr(r->vmflags, want), "%s: VmFlags lacks %s:%s", r->name, flag, r->vmflags);
}

/* Grow the stack VMA now, so that the deeper calls of the verification do not
 * move its start (its maps line is compared). */
__attribute__((noinline)) static void grow_stack(void)
{
	volatile uint8_t pad[256 * 1024];
	for (size_t i = 0; i < sizeof(pad); i += PAGE)
		pad[i] = 1;
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	grow_stack();
	const long pagesize = sysconf(_SC_PAGESIZE);
	if (pagesize != PAGE)
		wl_die("page size %ld, this workload assumes 4096", pagesize);

	/* Heap: small chunks from the brk heap, one large chunk that malloc mmaps. */
	for (int i = 0; i < SMALL_ALLOCS; i++) {
		g_small[i] = malloc(64 + (size_t)i);
		if (!g_small[i])
			wl_die("malloc");
		memset(g_small[i], i, 64 + (size_t)i);
	}
	const size_t large_len = 8 << 20;
	uint8_t *large = malloc(large_len);
	if (!large)
		wl_die("malloc large");
	fill(large, large_len, "malloc-large");

	/* brk, moved by hand beyond malloc's heap */
	const size_t brk_len = 1 << 20;
	uint8_t *brk_area = sbrk((intptr_t)brk_len);
	if (brk_area == (void *)-1)
		wl_die("sbrk");
	fill(brk_area, brk_len, "brk");

	uint8_t *anon = map_anon(4 << 20, PROT_READ | PROT_WRITE, 0);
	fill(anon, 4 << 20, "anon");

	const size_t sparse_pages = 64;
	uint8_t *sparse = map_anon(sparse_pages * PAGE, PROT_READ | PROT_WRITE, 0);
	for (size_t i = 0; i < sparse_pages; i += 3)
		fill(sparse + i * PAGE, PAGE, "sparse");

	uint8_t *grows = map_anon(16 * PAGE, PROT_READ | PROT_WRITE, MAP_GROWSDOWN);
	fill(grows, 16 * PAGE, "growsdown");

	uint8_t *none = map_anon(4 * PAGE, PROT_NONE, 0);
	uint8_t *guarded = map_anon(3 * PAGE, PROT_READ | PROT_WRITE, 0);
	fill(guarded, PAGE, "guarded-low");
	fill(guarded + 2 * PAGE, PAGE, "guarded-high");
	SETUP(mprotect(guarded + PAGE, PAGE, PROT_NONE));

	uint8_t *rdonly = map_anon(2 * PAGE, PROT_READ | PROT_WRITE, 0);
	fill(rdonly, 2 * PAGE, "rdonly");
	SETUP(mprotect(rdonly, 2 * PAGE, PROT_READ));

	/* mov $0x2a, %eax; ret  -- then a pattern */
	static const uint8_t code[] = { 0xb8, 0x2a, 0x00, 0x00, 0x00, 0xc3 };
	uint8_t *exec = map_anon(PAGE, PROT_READ | PROT_WRITE, 0);
	memcpy(exec, code, sizeof(code));
	fill(exec + 64, PAGE - 64, "exec");
	SETUP(mprotect(exec, PAGE, PROT_READ | PROT_EXEC));

	char priv_path[PATH_MAX + 32], shared_path[PATH_MAX + 32];
	int priv_fd = make_file("private.dat", PRIV_PAGES, priv_path, sizeof(priv_path));
	uint8_t *priv = mmap(NULL, PRIV_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, priv_fd, 0);
	if (priv == MAP_FAILED)
		wl_die("mmap private.dat");
	for (size_t k = 0; k < sizeof(priv_written) / sizeof(priv_written[0]); k++)
		fill(priv + (size_t)priv_written[k] * PAGE, PAGE, priv_names[k]);
	volatile uint8_t sink = priv[PRIV_READ_PAGE * PAGE + 100];   /* read fault only */
	(void)sink;

	int shared_fd = make_file("shared.dat", SHARED_FILE_PAGES, shared_path, sizeof(shared_path));
	uint8_t *shared = mmap(NULL, SHARED_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED,
			       shared_fd, SHARED_OFFSET_PAGES * PAGE);
	if (shared == MAP_FAILED)
		wl_die("mmap shared.dat");
	fill(shared, SHARED_PAGES * PAGE, "shared");

	uint8_t *dontfork = map_anon(2 * PAGE, PROT_READ | PROT_WRITE, 0);
	SETUP(madvise(dontfork, 2 * PAGE, MADV_DONTFORK));
	fill(dontfork, 2 * PAGE, "dontfork");
	uint8_t *dontdump = map_anon(2 * PAGE, PROT_READ | PROT_WRITE, 0);
	SETUP(madvise(dontdump, 2 * PAGE, MADV_DONTDUMP));
	fill(dontdump, 2 * PAGE, "dontdump");
	uint8_t *huge = map_anon(4 << 20, PROT_READ | PROT_WRITE, 0);
	SETUP(madvise(huge, 4 << 20, MADV_HUGEPAGE));
	fill(huge, 4 << 20, "hugepage");

	const size_t big_len = (size_t)BIG_MIB << 20;
	uint8_t *big = map_anon(big_len, PROT_READ | PROT_WRITE, 0);
	fill(big, big_len, "big");

	uint8_t stack_array[32768];
	fill(stack_array, sizeof(stack_array), "stack");

	add_region("malloc-small", g_small[0], 64);
	add_region("malloc-large", large, large_len);
	add_region("brk", brk_area, brk_len);
	add_region("anon", anon, 4 << 20);
	add_region("sparse", sparse, sparse_pages * PAGE);
	struct region *r_grows = add_region("growsdown", grows, 16 * PAGE);
	struct region *r_none = add_region("prot-none", none, 4 * PAGE);
	add_region("guarded-low", guarded, PAGE);
	struct region *r_guard = add_region("guard-page", guarded + PAGE, PAGE);
	add_region("guarded-high", guarded + 2 * PAGE, PAGE);
	struct region *r_ro = add_region("rdonly", rdonly, 2 * PAGE);
	struct region *r_exec = add_region("exec", exec, PAGE);
	add_region("private-file", priv, PRIV_PAGES * PAGE);
	struct region *r_shared = add_region("shared-file", shared, SHARED_PAGES * PAGE);
	struct region *r_dc = add_region("dontfork", dontfork, 2 * PAGE);
	struct region *r_dd = add_region("dontdump", dontdump, 2 * PAGE);
	struct region *r_hg = add_region("hugepage", huge, 4 << 20);
	add_region("big", big, big_len);
	add_region("stack", stack_array, sizeof(stack_array));

	read_layout();
	for (int i = 0; i < g_nregions; i++) {
		describe_range(g_regions[i].addr, g_regions[i].len, g_regions[i].maps, sizeof(g_regions[i].maps));
		vmflags_of(g_regions[i].addr, g_regions[i].vmflags, sizeof(g_regions[i].vmflags));
	}
	g_cmdline_len = wl_read_file("/proc/self/cmdline", g_cmdline, sizeof(g_cmdline));
	g_environ_len = wl_read_file("/proc/self/environ", g_environ, sizeof(g_environ));
	void *brk_at_ready = sbrk(0);

	wl_ready("big=%p\nbig_len=%zu\nbrk=%p\nsparse=%p\n", (void *)big, big_len, brk_at_ready,
		 (void *)sparse);
	wl_wait_go(NULL);
	void *brk_at_go = sbrk(0);   /* first, before anything could move it */

	if (wl_sabotage)
		big[big_len / 2 + 12345] ^= 0x01;

	/* Layout: each region's maps line and VmFlags exactly as at ready. */
	read_layout();
	for (int i = 0; i < g_nregions; i++) {
		struct region *r = &g_regions[i];
		char now[512], flags[256];
		describe_range(r->addr, r->len, now, sizeof(now));
		CHECK(strcmp(now, r->maps) == 0, "%s: mapped as '%s', now '%s'", r->name, r->maps, now);
		vmflags_of(r->addr, flags, sizeof(flags));
		CHECK(strcmp(flags, r->vmflags) == 0, "%s: VmFlags were '%s', now '%s'",
		      r->name, r->vmflags, flags);
	}
	check_vmflag(r_grows, "gd");
	check_vmflag(r_dc, "dc");
	check_vmflag(r_dd, "dd");
	check_vmflag(r_hg, "hg");
	CHECK(strncmp(r_none->maps, "---p ", 5) == 0, "prot-none: %s", r_none->maps);
	CHECK(strncmp(r_guard->maps, "---p ", 5) == 0, "guard-page: %s", r_guard->maps);
	CHECK(strncmp(r_ro->maps, "r--p ", 5) == 0, "rdonly: %s", r_ro->maps);
	CHECK(strncmp(r_exec->maps, "r-xp ", 5) == 0, "exec: %s", r_exec->maps);
	CHECK(strncmp(r_shared->maps, "rw-s ", 5) == 0, "shared-file: %s", r_shared->maps);

	/* Contents */
	for (int i = 0; i < SMALL_ALLOCS; i++)
		for (int j = 0; j < 64 + i; j++)
			if (g_small[i][j] != (uint8_t)i) {
				wl_fail("malloc-small[%d] byte %d changed", i, j);
				break;
			}
	check_fill(large, large_len, "malloc-large");
	check_fill(brk_area, brk_len, "brk");
	check_fill(anon, 4 << 20, "anon");
	for (size_t i = 0; i < sparse_pages; i++) {
		if (i % 3 == 0)
			check_fill(sparse + i * PAGE, PAGE, "sparse");
		else
			check_zero(sparse + i * PAGE, PAGE, "sparse hole");
	}
	check_fill(grows, 16 * PAGE, "growsdown");
	check_fill(guarded, PAGE, "guarded-low");
	check_fill(guarded + 2 * PAGE, PAGE, "guarded-high");
	check_fill(rdonly, 2 * PAGE, "rdonly");
	check_fill(exec + 64, PAGE - 64, "exec");
	CHECK(memcmp(exec, code, sizeof(code)) == 0, "exec: code bytes changed");
	if (strncmp(r_exec->maps, "r-xp ", 5) == 0) {
		int (*fn)(void) = (int (*)(void))(void *)exec;
		CHECK_EQ("calling the exec region", fn(), 42);
	}
	check_private_file(priv, priv_fd);
	check_shared_file(shared, shared_fd);
	check_fill(dontfork, 2 * PAGE, "dontfork");
	check_fill(dontdump, 2 * PAGE, "dontdump");
	check_fill(huge, 4 << 20, "hugepage");
	check_fill(stack_array, sizeof(stack_array), "stack");
	check_fill(big, big_len, "big");

	ssize_t n = wl_read_file("/proc/self/cmdline", g_buf, sizeof(g_buf));
	CHECK(n == g_cmdline_len && memcmp(g_buf, g_cmdline, (size_t)n) == 0, "/proc/self/cmdline changed");
	n = wl_read_file("/proc/self/environ", g_buf, sizeof(g_buf));
	CHECK(n == g_environ_len && memcmp(g_buf, g_environ, (size_t)n) == 0, "/proc/self/environ changed");

	/* The break: where it was, and still movable. */
	CHECK(brk_at_go == brk_at_ready, "sbrk(0) was %p, now %p", brk_at_ready, brk_at_go);
	uint8_t *more = sbrk(PAGE);
	if (more == (void *)-1) {
		wl_fail("sbrk(4096) after go: %s", strerror(errno));
	} else {
		CHECK(more == brk_at_go, "sbrk(4096) returned %p, want %p", (void *)more, brk_at_go);
		check_zero(more, PAGE, "new brk page");
		memset(more, 0xab, PAGE);
		CHECK(sbrk(0) == (void *)(more + PAGE), "sbrk(0) after growing: %p", sbrk(0));
	}
	return wl_finish();
}
