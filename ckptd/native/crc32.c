/*
 * crc32.c - ckptd.native._crc32: the CRC-32 of zlib (reflected polynomial
 * 0xEDB88320, same results as zlib.crc32), computed with carry-less
 * multiplication where the CPU has it.
 *
 * Every image record carries this checksum, so a dump or restore computes it
 * over every byte of memory: zlib's table-driven loop does about 5-7 GB/s
 * here and takes a CPU for most of a gigabyte's dump. Folding 64 bytes at a
 * time with PCLMULQDQ does several times that.
 *
 * The method: the message is folded, 4 x 128 bits at a time, by multiplying
 * each lane by x^(512 +- 32) mod P (carry-less) and adding the next block;
 * the 4 lanes are then folded into one with x^(128 +- 32) mod P, 128 bits
 * reduced to 64 with x^64 mod P, and 64 to 32 by Barrett reduction. All
 * constants are in the bit-reflected domain, shifted left by one; they are
 * derived from P alone (tests/unit/test_native_crc.py recomputes them).
 * Tails shorter than 16 bytes and CPUs without PCLMULQDQ use a byte table.
 * The GIL is released while a buffer is checksummed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <immintrin.h>

static uint32_t table[256];
static int have_clmul;

static void make_table(void)
{
	for (uint32_t n = 0; n < 256; n++) {
		uint32_t c = n;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		table[n] = c;
	}
}

/* On the inverted crc, as the folding works: c = ~crc on entry. */
static uint32_t bytewise(uint32_t c, const uint8_t *p, size_t n)
{
	while (n--)
		c = table[(c ^ *p++) & 0xFF] ^ (c >> 8);
	return c;
}

#define CLMUL(a, b, imm) _mm_clmulepi64_si128((a), (b), (imm))
#define LOAD(p) _mm_loadu_si128((const __m128i *)(p))

/* n >= 64 and a multiple of 16. */
__attribute__((target("pclmul,sse4.1")))
static uint32_t folded(uint32_t c, const uint8_t *p, size_t n)
{
	const __m128i k1k2 = _mm_set_epi64x(0x1C6E41596LL, 0x154442BD4LL);  /* x^(512-32), x^(512+32) */
	const __m128i k3k4 = _mm_set_epi64x(0x0CCAA009ELL, 0x1751997D0LL);  /* x^(128-32), x^(128+32) */
	const __m128i k5 = _mm_set_epi64x(0, 0x163CD6124LL);                 /* x^64 */
	const __m128i mu_p = _mm_set_epi64x(0x1F7011641LL, 0x1DB710641LL);  /* x^64 / P, P */
	const __m128i low32 = _mm_setr_epi32(-1, 0, -1, 0);
	__m128i a = _mm_xor_si128(LOAD(p), _mm_cvtsi32_si128((int)c));
	__m128i b = LOAD(p + 16), d = LOAD(p + 32), e = LOAD(p + 48);
	p += 64;
	n -= 64;
	while (n >= 64) {
		__m128i a0 = CLMUL(a, k1k2, 0x00), b0 = CLMUL(b, k1k2, 0x00);
		__m128i d0 = CLMUL(d, k1k2, 0x00), e0 = CLMUL(e, k1k2, 0x00);
		a = _mm_xor_si128(_mm_xor_si128(CLMUL(a, k1k2, 0x11), a0), LOAD(p));
		b = _mm_xor_si128(_mm_xor_si128(CLMUL(b, k1k2, 0x11), b0), LOAD(p + 16));
		d = _mm_xor_si128(_mm_xor_si128(CLMUL(d, k1k2, 0x11), d0), LOAD(p + 32));
		e = _mm_xor_si128(_mm_xor_si128(CLMUL(e, k1k2, 0x11), e0), LOAD(p + 48));
		p += 64;
		n -= 64;
	}
	/* Four lanes into one, then the remaining 16-byte blocks. */
	a = _mm_xor_si128(_mm_xor_si128(CLMUL(a, k3k4, 0x11), CLMUL(a, k3k4, 0x00)), b);
	a = _mm_xor_si128(_mm_xor_si128(CLMUL(a, k3k4, 0x11), CLMUL(a, k3k4, 0x00)), d);
	a = _mm_xor_si128(_mm_xor_si128(CLMUL(a, k3k4, 0x11), CLMUL(a, k3k4, 0x00)), e);
	for (; n >= 16; p += 16, n -= 16)
		a = _mm_xor_si128(_mm_xor_si128(CLMUL(a, k3k4, 0x11), CLMUL(a, k3k4, 0x00)), LOAD(p));
	/* 128 bits to 64. */
	a = _mm_xor_si128(_mm_srli_si128(a, 8), CLMUL(a, k3k4, 0x10));
	a = _mm_xor_si128(CLMUL(_mm_and_si128(a, low32), k5, 0x00), _mm_srli_si128(a, 4));
	/* 64 bits to 32: Barrett reduction. */
	__m128i t = CLMUL(_mm_and_si128(a, low32), mu_p, 0x10);
	t = CLMUL(_mm_and_si128(t, low32), mu_p, 0x00);
	return (uint32_t)_mm_extract_epi32(_mm_xor_si128(a, t), 1);
}

static uint32_t checksum(uint32_t crc, const uint8_t *p, size_t n)
{
	uint32_t c = ~crc;
	if (have_clmul && n >= 64) {
		size_t whole = n & ~(size_t)15;
		c = folded(c, p, whole);
		p += whole;
		n -= whole;
	}
	return ~bytewise(c, p, n);
}

static PyObject *crc32(PyObject *self, PyObject *args)
{
	Py_buffer data;
	unsigned int value = 0;
	(void)self;
	if (!PyArg_ParseTuple(args, "y*|I:crc32", &data, &value))
		return NULL;
	uint32_t crc;
	if (data.len >= 4096) {
		Py_BEGIN_ALLOW_THREADS
		crc = checksum(value, data.buf, (size_t)data.len);
		Py_END_ALLOW_THREADS
	} else {
		crc = checksum(value, data.buf, (size_t)data.len);
	}
	PyBuffer_Release(&data);
	return PyLong_FromUnsignedLong(crc);
}

static PyObject *accelerated(PyObject *self, PyObject *unused)
{
	(void)self;
	(void)unused;
	return PyBool_FromLong(have_clmul);
}

static PyMethodDef methods[] = {
	{"crc32", crc32, METH_VARARGS,
	 "crc32(data, value=0) -> int: zlib.crc32's result, faster."},
	{"accelerated", accelerated, METH_NOARGS,
	 "accelerated() -> bool: whether the CPU's carry-less multiply is used."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_crc32",
	"zlib-compatible CRC-32 with PCLMULQDQ (see crc32.c).", -1, methods,
	NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__crc32(void)
{
	make_table();
	__builtin_cpu_init();
	have_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
	return PyModule_Create(&module);
}
