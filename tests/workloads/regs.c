/*
 * regs.c - CPU register state survives checkpoint/restore.
 *
 * One inline-asm block loads distinctive values into registers, publishes
 * DIR/ready with a raw rename syscall, waits for DIR/go with raw nanosleep and
 * access syscalls, then stores the registers back to memory. Between load and
 * store only raw syscalls run, and they preserve every register except rax, rcx
 * and r11: any difference after go comes from the checkpoint/restore.
 * (A libc call would not do: every vector register is caller-saved, and glibc's
 * string functions use them.)
 *
 * Checked:
 *   - general purpose: rbx, rdx, r8, r9, r10, r12..r15
 *   - SSE: xmm8; MXCSR with round-toward-zero and flush-to-zero
 *   - AVX: ymm15, whose upper half lives only in the XSAVE area
 *   - AVX-512 (when the CPU has it): zmm31 and opmask k7
 *   - x87: a long double held in st0, control word with truncating rounding
 *   - fs base: a __thread variable, %fs:0 (the TCB's self pointer), ARCH_GET_FS
 *   - gs base: set with ARCH_SET_GS to a buffer, read back through %gs:0
 *
 * Built twice: dynamic ("regs") and -static ("regs_static"); a static binary has
 * no ld.so mappings and sets up TLS itself.
 */
#include "wl.h"

#include <asm/prctl.h>

#define STR_(x) #x
#define STR(x) STR_(x)

enum { NGPR = 9 };
static const char *const gpr_names[NGPR] = {
	"rbx", "rdx", "r8", "r9", "r10", "r12", "r13", "r14", "r15",
};

struct regs {
	uint64_t gpr[NGPR];
	uint8_t xmm8[16];
	uint8_t ymm15[32];
	uint8_t zmm31[64];
	uint16_t k7;
	uint16_t fcw;
	uint32_t mxcsr;
	long double st0;
};

/* Not on the stack: the asm addresses them %rip-relative, needing no register. */
static struct regs g_in, g_out;
static struct { uint8_t avx, avx512, sabotage; } g_flags;
static struct { uint16_t fcw; uint32_t mxcsr; } g_saved;  /* C's own FP modes */
static uint64_t g_loops;
static long g_rename_rc;
static char g_ready_tmp[PATH_MAX + 64], g_ready[PATH_MAX + 64], g_go[PATH_MAX + 64];
static const struct timespec g_nap = { 0, WL_NAP_NS };
static const char g_msg[] = "READY\n";

static __thread uint64_t tls_magic = 0x7e57ab1e5eed0001ULL;
static uint64_t gs_buffer[4] = { 0x6565656565650001ULL, 2, 3, 4 };

static void fill_inputs(void)
{
	for (int i = 0; i < NGPR; i++)
		g_in.gpr[i] = 0x1111000000000000ULL * (uint64_t)(i + 1) + 0xc0ffee00ULL + (uint64_t)i;
	for (int i = 0; i < 16; i++)
		g_in.xmm8[i] = (uint8_t)(0x80 + i);
	for (int i = 0; i < 32; i++)
		g_in.ymm15[i] = (uint8_t)(0xa0 + i * 3);   /* halves differ: a lane swap shows */
	for (int i = 0; i < 64; i++)
		g_in.zmm31[i] = (uint8_t)(0x11 * (i % 15) + i);
	g_in.k7 = 0xa5c3;
	g_in.fcw = 0x0f7f;      /* x87: all exceptions masked, 64-bit precision, truncate */
	g_in.mxcsr = 0xff80;    /* SSE: masked exceptions, round toward zero, flush-to-zero */
	g_in.st0 = 2.718281828459045235360287471352662497757L * 1e300L;
}

static void hold_registers_until_go(void)
{
	asm volatile(
		"fnstcw %[saved_fcw]\n\t"
		"stmxcsr %[saved_mxcsr]\n\t"
		"fldcw %[in_fcw]\n\t"
		"fldt %[in_st0]\n\t"
		"ldmxcsr %[in_mxcsr]\n\t"
		"movdqu %[in_xmm], %%xmm8\n\t"
		"cmpb $0, 0+%[flags]\n\t"
		"je 1f\n\t"
		"vmovdqu %[in_ymm], %%ymm15\n\t"
		"1: cmpb $0, 1+%[flags]\n\t"
		"je 2f\n\t"
		"vmovdqu64 %[in_zmm], %%zmm31\n\t"
		"kmovw %[in_k], %%k7\n\t"
		"2:\n\t"
		/* rename(ready.tmp, ready); write(1, "READY\n", 6) */
		"mov $" STR(SYS_rename) ", %%eax\n\t"
		"lea %[tmp], %%rdi\n\t"
		"lea %[ready], %%rsi\n\t"
		"syscall\n\t"
		"mov %%rax, %[rename_rc]\n\t"
		"mov $" STR(SYS_write) ", %%eax\n\t"
		"mov $1, %%edi\n\t"
		"lea %[msg], %%rsi\n\t"
		"mov $6, %%edx\n\t"
		"syscall\n\t"
		"mov 0+%[in_gpr], %%rbx\n\t"
		"mov 8+%[in_gpr], %%rdx\n\t"
		"mov 16+%[in_gpr], %%r8\n\t"
		"mov 24+%[in_gpr], %%r9\n\t"
		"mov 32+%[in_gpr], %%r10\n\t"
		"mov 40+%[in_gpr], %%r12\n\t"
		"mov 48+%[in_gpr], %%r13\n\t"
		"mov 56+%[in_gpr], %%r14\n\t"
		"mov 64+%[in_gpr], %%r15\n\t"
		/* do { nanosleep(10 ms); loops++; } while (access(go, F_OK) != 0) */
		"3: mov $" STR(SYS_nanosleep) ", %%eax\n\t"
		"lea %[nap], %%rdi\n\t"
		"xor %%esi, %%esi\n\t"
		"syscall\n\t"
		"incq %[loops]\n\t"
		"mov $" STR(SYS_access) ", %%eax\n\t"
		"lea %[go], %%rdi\n\t"
		"xor %%esi, %%esi\n\t"
		"syscall\n\t"
		"test %%rax, %%rax\n\t"
		"jnz 3b\n\t"
		/* WL_SABOTAGE: damage r12 and swap the halves of ymm15 */
		"cmpb $0, 2+%[flags]\n\t"
		"je 4f\n\t"
		"xor $1, %%r12\n\t"
		"cmpb $0, 0+%[flags]\n\t"
		"je 4f\n\t"
		"vperm2f128 $1, %%ymm15, %%ymm15, %%ymm15\n\t"
		"4:\n\t"
		"mov %%rbx, 0+%[out_gpr]\n\t"
		"mov %%rdx, 8+%[out_gpr]\n\t"
		"mov %%r8, 16+%[out_gpr]\n\t"
		"mov %%r9, 24+%[out_gpr]\n\t"
		"mov %%r10, 32+%[out_gpr]\n\t"
		"mov %%r12, 40+%[out_gpr]\n\t"
		"mov %%r13, 48+%[out_gpr]\n\t"
		"mov %%r14, 56+%[out_gpr]\n\t"
		"mov %%r15, 64+%[out_gpr]\n\t"
		"fstpt %[out_st0]\n\t"
		"fnstcw %[out_fcw]\n\t"
		"stmxcsr %[out_mxcsr]\n\t"
		"movdqu %%xmm8, %[out_xmm]\n\t"
		"cmpb $0, 0+%[flags]\n\t"
		"je 5f\n\t"
		"vmovdqu %%ymm15, %[out_ymm]\n\t"
		"5: cmpb $0, 1+%[flags]\n\t"
		"je 6f\n\t"
		"vmovdqu64 %%zmm31, %[out_zmm]\n\t"
		"kmovw %%k7, %[out_k]\n\t"
		"6:\n\t"
		"fldcw %[saved_fcw]\n\t"
		"ldmxcsr %[saved_mxcsr]\n\t"
		"cmpb $0, 0+%[flags]\n\t"
		"je 7f\n\t"
		"vzeroupper\n\t"
		"7:\n\t"
		: [out_gpr] "=m"(g_out.gpr), [out_xmm] "=m"(g_out.xmm8),
		  [out_ymm] "=m"(g_out.ymm15), [out_zmm] "=m"(g_out.zmm31),
		  [out_k] "=m"(g_out.k7), [out_fcw] "=m"(g_out.fcw),
		  [out_mxcsr] "=m"(g_out.mxcsr), [out_st0] "=m"(g_out.st0),
		  [loops] "+m"(g_loops), [rename_rc] "=m"(g_rename_rc),
		  [saved_fcw] "+m"(g_saved.fcw), [saved_mxcsr] "+m"(g_saved.mxcsr)
		: [in_gpr] "m"(g_in.gpr), [in_xmm] "m"(g_in.xmm8), [in_ymm] "m"(g_in.ymm15),
		  [in_zmm] "m"(g_in.zmm31), [in_k] "m"(g_in.k7), [in_fcw] "m"(g_in.fcw),
		  [in_mxcsr] "m"(g_in.mxcsr), [in_st0] "m"(g_in.st0), [flags] "m"(g_flags),
		  [tmp] "m"(g_ready_tmp), [ready] "m"(g_ready), [msg] "m"(g_msg),
		  [nap] "m"(g_nap), [go] "m"(g_go)
		: "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11",
		  "r12", "r13", "r14", "r15", "xmm8", "xmm15", "memory", "cc");
}

static void check_bytes(const char *what, const uint8_t *got, const uint8_t *want, size_t n)
{
	if (memcmp(got, want, n) == 0)
		return;
	char hex[2 * 64 + 1];
	for (size_t i = 0; i < n && i < 64; i++)
		snprintf(hex + 2 * i, 3, "%02x", got[i]);
	wl_fail("%s changed: now %s", what, hex);
}

static uint64_t arch_get(int code)
{
	unsigned long v = 0;
	if (syscall(SYS_arch_prctl, code, &v) < 0)
		wl_fail("arch_prctl(%#x): %s", code, strerror(errno));
	return v;
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	fill_inputs();
	g_flags.avx = !!__builtin_cpu_supports("avx");
	g_flags.avx512 = !!__builtin_cpu_supports("avx512f");
	g_flags.sabotage = (uint8_t)wl_sabotage;

	SETUP(syscall(SYS_arch_prctl, ARCH_SET_GS, (unsigned long)gs_buffer));
	uint64_t fs_base = arch_get(ARCH_GET_FS), gs_base = arch_get(ARCH_GET_GS);
	uint64_t *tls_addr = &tls_magic;

	snprintf(g_ready_tmp, sizeof(g_ready_tmp), "%s/ready.tmp", wl_dir);
	snprintf(g_ready, sizeof(g_ready), "%s/ready", wl_dir);
	snprintf(g_go, sizeof(g_go), "%s/go", wl_dir);
	wl_prepare_ready("avx=%d\navx512=%d\nfs_base=%#lx\ngs_base=%#lx\n",
			 g_flags.avx, g_flags.avx512, (unsigned long)fs_base, (unsigned long)gs_base);

	hold_registers_until_go();

	CHECK(g_rename_rc == 0, "rename(ready.tmp, ready) returned %ld", g_rename_rc);
	CHECK(g_loops > 0, "the wait loop never ran");
	for (int i = 0; i < NGPR; i++)
		if (g_out.gpr[i] != g_in.gpr[i])
			wl_fail("%s: got %#lx, want %#lx", gpr_names[i],
				(unsigned long)g_out.gpr[i], (unsigned long)g_in.gpr[i]);
	check_bytes("xmm8", g_out.xmm8, g_in.xmm8, 16);
	if (g_flags.avx)
		check_bytes("ymm15", g_out.ymm15, g_in.ymm15, 32);
	if (g_flags.avx512) {
		check_bytes("zmm31", g_out.zmm31, g_in.zmm31, 64);
		CHECK_EQ("k7", g_out.k7, g_in.k7);
	}
	check_bytes("st0 (x87 80-bit)", (const uint8_t *)&g_out.st0, (const uint8_t *)&g_in.st0, 10);
	CHECK_EQ("x87 control word", g_out.fcw, g_in.fcw);
	CHECK_EQ("MXCSR", g_out.mxcsr, g_in.mxcsr);

	uint64_t tcb_self;
	asm volatile("mov %%fs:0, %0" : "=r"(tcb_self));
	CHECK_EQ("ARCH_GET_FS", arch_get(ARCH_GET_FS), fs_base);
	CHECK_EQ("%fs:0 (TCB self pointer)", tcb_self, fs_base);
	CHECK(&tls_magic == tls_addr, "&tls_magic moved: %p, was %p", (void *)&tls_magic, (void *)tls_addr);
	CHECK_EQ("__thread tls_magic", tls_magic, 0x7e57ab1e5eed0001ULL);

	uint64_t through_gs;
	asm volatile("mov %%gs:0, %0" : "=r"(through_gs));
	CHECK_EQ("ARCH_GET_GS", arch_get(ARCH_GET_GS), gs_base);
	CHECK_EQ("%gs:0", through_gs, gs_buffer[0]);
	return wl_finish();
}
