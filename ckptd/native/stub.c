/*
 * ckptd-stub: the process a restored task starts life as.
 *
 * The restorer clones a task with the original PID, has it exec this program
 * under ptrace, and then replaces its whole address space with the image's.
 * So the stub must be freestanding: no libc (a libc would register rseq, set
 * up TLS and signal state of its own), position-independent, and tiny. All it
 * does by itself is wait, stopped, for the tracer; everything else is done to
 * it from outside.
 */

#define SYS_pause 34
#define SYS_getpid 39
#define SYS_kill 62
#define SYS_exit_group 231
#define SIGSTOP 19

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
