/*
 * mem1g.c - a large address space for benchmarks: N MiB (argv[2], default 1024) of
 * private anonymous memory, every page written with pseudo-random data (no zero
 * pages, nothing compressible), checked after go by regenerating the sequence.
 *
 *   mem1g DIR [MIB]
 */
#include "wl.h"

#include <sys/mman.h>

#define SEED 0x9e3779b97f4a7c15ULL

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	long mib = argc > 2 ? strtol(argv[2], NULL, 10) : 1024;
	if (mib <= 0)
		wl_die("bad size '%s' MiB", argv[2]);
	size_t words = (size_t)mib << 17;   /* MiB -> 8-byte words */
	uint64_t *mem = mmap(NULL, words * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		wl_die("mmap %ld MiB", mib);
	uint64_t s = SEED;
	for (size_t i = 0; i < words; i++)
		mem[i] = wl_xorshift(&s);

	wl_ready("mib=%ld\naddr=%p\n", mib, (void *)mem);
	wl_wait_go(NULL);

	if (wl_sabotage)
		mem[words / 3] ^= 1;
	s = SEED;
	for (size_t i = 0; i < words; i++)
		if (mem[i] != wl_xorshift(&s)) {
			wl_fail("word %zu (address %p, page %zu) differs", i, (void *)&mem[i], i / 512);
			break;
		}
	return wl_finish();
}
