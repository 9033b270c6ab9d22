/*
 * ckptd-stub: the process a restored task starts life as.
 *
 * The restorer gives a task the original PID, has it exec this program
 * under ptrace, and then replaces its whole address space with the image's.
 * So the stub must be freestanding: no libc (a libc would register rseq, set
 * up TLS and signal state of its own), position-independent, and tiny. All it
 * does by itself is stop (SIGSTOP, right at _start) and wait for the tracer;
 * everything else is done to it from outside.
 *
 * It also carries the code the restorer copies into the task's trampoline
 * page, between the symbols ckptd_blob and ckptd_blob_end (found by the
 * restorer in this file's symbol table):
 *
 *   ckptd_blob + 0   "syscall; int3": one injected syscall
 *   ckptd_runner     the batch runner: rdi = records, rsi = count. Each record
 *                    is 9 u64: nr, args[6], flags, result. Flag bit i (0-5):
 *                    args[i] is the index of an earlier record whose result
 *                    replaces it. Bit 8: a failure does not stop the batch.
 *                    Stops with int3; r14 = index of the record it stopped at
 *                    (= count when all ran), rax = 0 or that record's -errno.
 * The blob uses no data and no relocations, so it runs at any address.
 */

#define SYS_pause 34
#define SYS_getpid 39
#define SYS_kill 62
#define SIGSTOP 19

__asm__(
	".text\n"
	".globl ckptd_blob\n"
	"ckptd_blob:\n"
	"	syscall\n"
	"	int3\n"
	".globl ckptd_runner\n"
	"ckptd_runner:\n"
	"	mov %rdi, %r12\n"
	"	mov %rsi, %r13\n"
	"	xor %r14d, %r14d\n"
	"	mov %rdi, %r15\n"
	"10:	cmp %r13, %r14\n"
	"	jae 18f\n"
	"	mov 56(%r15), %rbx\n"
	"	mov 8(%r15), %rdi\n"
	"	bt $0, %rbx\n"
	"	jnc 11f\n"
	"	imul $72, %rdi, %rdi\n"
	"	mov 64(%r12,%rdi), %rdi\n"
	"11:	mov 16(%r15), %rsi\n"
	"	bt $1, %rbx\n"
	"	jnc 12f\n"
	"	imul $72, %rsi, %rsi\n"
	"	mov 64(%r12,%rsi), %rsi\n"
	"12:	mov 24(%r15), %rdx\n"
	"	bt $2, %rbx\n"
	"	jnc 13f\n"
	"	imul $72, %rdx, %rdx\n"
	"	mov 64(%r12,%rdx), %rdx\n"
	"13:	mov 32(%r15), %r10\n"
	"	bt $3, %rbx\n"
	"	jnc 14f\n"
	"	imul $72, %r10, %r10\n"
	"	mov 64(%r12,%r10), %r10\n"
	"14:	mov 40(%r15), %r8\n"
	"	bt $4, %rbx\n"
	"	jnc 15f\n"
	"	imul $72, %r8, %r8\n"
	"	mov 64(%r12,%r8), %r8\n"
	"15:	mov 48(%r15), %r9\n"
	"	bt $5, %rbx\n"
	"	jnc 16f\n"
	"	imul $72, %r9, %r9\n"
	"	mov 64(%r12,%r9), %r9\n"
	"16:	mov (%r15), %rax\n"
	"	syscall\n"
	"	mov %rax, 64(%r15)\n"
	"	cmp $-4095, %rax\n"
	"	jb 17f\n"
	"	bt $8, %rbx\n"
	"	jnc 19f\n"
	"17:	add $72, %r15\n"
	"	inc %r14\n"
	"	jmp 10b\n"
	"18:	xor %eax, %eax\n"
	"19:	int3\n"
	".globl ckptd_blob_end\n"
	"ckptd_blob_end:\n"
);

static long sys1(long nr, long a) {
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(nr), "D"(a) : "rcx", "r11", "memory");
	return ret;
}

static long sys2(long nr, long a, long b) {
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(nr), "D"(a), "S"(b) : "rcx", "r11", "memory");
	return ret;
}

void _start(void) {
	/* Stop so that a tracer that has not seized us yet finds us parked;
	 * a tracer that has seized us interrupts us anyway. */
	sys2(SYS_kill, sys1(SYS_getpid, 0), SIGSTOP);
	for (;;)
		sys1(SYS_pause, 0);
}
