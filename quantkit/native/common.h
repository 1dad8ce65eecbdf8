/* What quantkit's kernels share: float bit tricks, float16 / bfloat16 rounding, the fork-join over pthreads
and the buffer checks. Each family's kernels live in a file of their own (bnb.c, ct.c, gguf.c, gptq.c; dense.c checks dense output); module.c makes
them one extension, quantkit.native._kernels.

Every kernel gives the bytes of its numpy reference (quantkit/methods/FAMILY/): every value is a float32 and
every operation is the reference's, in its order. Build with -ffp-contract=off (a fused multiply-add
rounds once where the reference rounds twice) and never with -ffast-math. Loops are branch-free so
compilers vectorize them.

Inputs are any C-contiguous buffer, read-only ones included: float32 values or bfloat16 bits (uint16).
Outputs are buffers the Python wrappers allocate. Each call checks every length before touching memory,
releases the GIL, and splits its work over `threads` pthreads that are joined before it returns.
*/
#ifndef QUANTKIT_COMMON_H
#define QUANTKIT_COMMON_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

/* The hot loops get an AVX2 copy beside the baseline one, chosen when the module loads (an ifunc). */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define HOT __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef HOT
#define HOT
#endif

/* Whether hand-written AVX2 paths run (where the CPU has AVX2): module.c's `simd(flag)` turns them off so
   that tests can compare them with the portable loops on the same machine. */
extern int quantkit_simd;
static inline int simd_avx2(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    return quantkit_simd && __builtin_cpu_supports("avx2");
#else
    return 0;
#endif
}

/* A kernel's body is inlined twice into its entry point for parallel_for, once with `bf16` a constant 1
   and once 0, so that each loop reads one input type and vectorizes. */
#if defined(__GNUC__)
#define BODY static inline __attribute__((always_inline))
#else
#define BODY static inline
#endif

#define PART(kernel, args_t)                                                       \
    HOT static void kernel##_part(const void *ctx, Py_ssize_t lo, Py_ssize_t hi) { \
        const args_t *args = ctx;                                                  \
        if (args->bf16)                                                            \
            kernel##_body(args, lo, hi, 1);                                        \
        else                                                                       \
            kernel##_body(args, lo, hi, 0);                                        \
    }

#define SIGN 0x80000000u
#define MAGNITUDE 0x7FFFFFFFu
#define EXPONENT 0x7F800000u   /* magnitude bits at or above this: infinity or NaN */
#define PARALLEL_MIN (1 << 20) /* below this many elements one thread is faster than starting more */
#define MAX_THREADS 256
#define TILE 4096              /* 4-bit: scaled values held before coding and packing; even */
static inline float as_float(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint32_t as_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

static inline Py_ssize_t min_size(Py_ssize_t a, Py_ssize_t b) { return a < b ? a : b; }

/* Element i of the input as float32 bits: bfloat16 bits shifted into place, or float32 bits as they are. */
static inline uint32_t load_bits(const void *src, int bf16, Py_ssize_t i) {
    return bf16 ? (uint32_t)((const uint16_t *)src)[i] << 16 : ((const uint32_t *)src)[i];
}

/* The largest magnitude among src[start, start + count), as bits: an integer max, exact because
   non-negative floats order like their bit patterns, and one that exposes NaN and infinity. */
static inline uint32_t peak_bits(const void *src, int bf16, Py_ssize_t start, Py_ssize_t count) {
    uint32_t peak = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t magnitude = load_bits(src, bf16, start + i) & MAGNITUDE;
        peak = magnitude > peak ? magnitude : peak;
    }
    return peak;
}

/* n codes (each below 2**bits; bits 2, 4 or 8; n <= TILE and a multiple of 32 / bits) packed lowest bits first
   into int32 words, as GPTQ's qweight and compressed-tensors' pack_int32 hold them. A word's codes are its
   little-endian bytes: packing into bytes first, then assembling the words, vectorizes. */
static inline void pack_words(const uint8_t *codes, Py_ssize_t n, const int bits, uint32_t *words) {
    const int per_byte = 8 / bits;
    uint8_t packed[TILE];
    for (Py_ssize_t k = 0; k < n / per_byte; k++) {
        uint8_t byte = 0;
        for (int j = 0; j < per_byte; j++)
            byte |= (uint8_t)(codes[k * per_byte + j] << (bits * j));
        packed[k] = byte;
    }
    for (Py_ssize_t w = 0; w < n / (4 * per_byte); w++) {
        const uint8_t *b = packed + w * 4;
        words[w] = b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
    }
}

/* The nearest integer to v, ties to even (numpy's rint), for |v| < 2**22: adding 1.5 * 2**23 leaves no
   bits below the units, the constant is even so ties go as v's would, and the integer is the sum's low
   bits. Unlike a float-to-int conversion it is defined for NaN and infinity too (as garbage). */
static inline int32_t rint_int(float v) { return (int32_t)(as_bits(v + 12582912.0f) - 0x4B400000u); }

/* ------------------------------------------------------------------------------------------------
   Fork-join: fn(ctx, lo, hi) over [0, count) in slices taken from a shared counter by the caller's thread
   and `threads - 1` new ones. Slices rather than one part each, because a new thread can take a few
   hundred microseconds to get going; meanwhile the others do its share. Every unit's output depends on
   that unit alone, so the bytes do not depend on who did which slice. */

typedef void (*part_fn)(const void *ctx, Py_ssize_t lo, Py_ssize_t hi);

typedef struct {
    part_fn fn;
    const void *ctx;
    Py_ssize_t count, slice;
    atomic_ptrdiff_t next;
} job_t;

static inline void *work(void *arg) {
    job_t *job = arg;
    for (;;) {
        const Py_ssize_t lo = atomic_fetch_add_explicit(&job->next, job->slice, memory_order_relaxed);
        if (lo >= job->count)
            return NULL;
        job->fn(job->ctx, lo, min_size(job->count, lo + job->slice));
    }
}

static inline void parallel_for(part_fn fn, const void *ctx, Py_ssize_t count, int threads) {
    pthread_t ids[MAX_THREADS];
    int started = 0;
    job_t job = {fn, ctx, count, count / ((Py_ssize_t)threads * 16) + 1, 0};
    while (started < threads - 1 && pthread_create(&ids[started], NULL, work, &job) == 0)
        started++;
    work(&job);
    for (int k = 0; k < started; k++)
        pthread_join(ids[k], NULL);
}

static inline int thread_count(int requested, Py_ssize_t elements) {
    if (elements < PARALLEL_MIN || requested < 1)
        return 1;
    return requested > MAX_THREADS ? MAX_THREADS : requested;
}

/* The float16 nearest to a float32 (ties to even), as a float32: 11 significant bits in float16's normal
   range, infinity beyond 65504, NaN kept; below 2**-14 multiples of 2**-24, which adding and taking away
   0.75 leaves (the sum's last bit is worth 2**-24). The two are blended through a mask, not a ?:,
   which GCC would turn into a branch around the float arithmetic and then not vectorize. */
static inline float float16_round(uint32_t bits) {
    const uint32_t magnitude = bits & MAGNITUDE;
    uint32_t rounded = (magnitude + 0xFFFu + ((magnitude >> 13) & 1u)) & 0xFFFFE000u;
    rounded = rounded > 0x477FE000u ? EXPONENT : rounded;
    rounded = magnitude >= EXPONENT ? magnitude : rounded;
    const uint32_t subnormal = as_bits((as_float(bits) + 0.75f) - 0.75f);
    const uint32_t normal = -(uint32_t)(magnitude >= 0x38800000u);
    return as_float((((bits & SIGN) | rounded) & normal) | (subnormal & ~normal));
}

/* The float16 bits of v rounded to nearest even, as numpy's astype(np.float16) and ggml's FP32_TO_FP16:
   infinity beyond 65504, and a NaN keeps the top of its payload (never all of it zero). */
static inline uint16_t float16_bits(float v) {
    const uint32_t bits = as_bits(v), sign = (bits >> 16) & 0x8000u;
    const float rounded = fabsf(float16_round(bits));
    const uint32_t magnitude = as_bits(rounded);
    const uint32_t nan = 0x7C00u | ((bits & 0x7FFFFFu) >> 13) | (uint32_t)((bits & 0x7FE000u) == 0);
    /* float16 subnormal or zero: a whole number of 2**-24, read off the low bits of a sum with 2**23 */
    const uint32_t subnormal = as_bits(rounded * 16777216.0f + 8388608.0f) - 0x4B000000u;
    const uint32_t normal = (((magnitude >> 23) - 112) << 10) | ((magnitude >> 13) & 0x3FFu);
    /* blended through masks, not branches, so that loops calling it vectorize */
    const uint32_t is_nan = -(uint32_t)(magnitude > EXPONENT), is_inf = -(uint32_t)(magnitude == EXPONENT);
    const uint32_t is_small = -(uint32_t)(magnitude < 0x38800000u);
    uint32_t out = (subnormal & is_small) | (normal & ~is_small);
    out = (0x7C00u & is_inf) | (out & ~is_inf);
    out = (nan & is_nan) | (out & ~is_nan);
    return (uint16_t)(sign | out);
}

/* bfloat16 bits of v, rounded to nearest even; a NaN stays a quiet NaN (as dtypes.bf16_bits). Blended
   through a mask, not a ?:, so that loops calling it vectorize. */
static inline uint16_t bf16_bits(float v) {
    const uint32_t bits = as_bits(v);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const uint32_t nan = -(uint32_t)((bits & MAGNITUDE) > EXPONENT);
    return (uint16_t)((((bits >> 16) | 0x40u) & nan) | (rounded & ~nan));
}

/* Dense dtypes as the kernels number them (native.DENSE): a weight's dtype S, or an output's. */
enum { S_BF16 = 0, S_F16 = 1, S_F32 = 2 };

/* The output dtype's bits of a float32, rounded to nearest even as dtypes.from_float32. */
static inline uint32_t dense_bits(float v, const int out) {
    if (out == S_BF16)
        return bf16_bits(v);
    if (out == S_F16)
        return float16_bits(v);
    return as_bits(v);
}

static inline void store(void *out, int bf16, Py_ssize_t i, uint32_t value) {
    if (bf16)
        ((uint16_t *)out)[i] = (uint16_t)value;
    else
        ((uint32_t *)out)[i] = value;
}

/* Buffers in, lengths checked. */

static inline void release(Py_buffer *views, int count) {
    for (int k = 0; k < count; k++)
        PyBuffer_Release(&views[k]);
}

/* Raise ValueError unless the buffer holds exactly `expected` bytes. */
static inline int check_length(const Py_buffer *view, Py_ssize_t expected, const char *what) {
    if (view->len == expected)
        return 0;
    PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", what, view->len, expected);
    return -1;
}

/* The entry points, one family a file. */
PyObject *py_quantize_4bit(PyObject *self, PyObject *args);
PyObject *py_quantize_int8(PyObject *self, PyObject *args);
PyObject *py_dequantize_4bit(PyObject *self, PyObject *args);
PyObject *py_q8_0(PyObject *self, PyObject *args);
PyObject *py_gguf_blocks(PyObject *self, PyObject *args);
PyObject *py_gptq_rtn(PyObject *self, PyObject *args);
PyObject *py_gptq_unpack_signed(PyObject *self, PyObject *args);
PyObject *py_gptq_pack_signed(PyObject *self, PyObject *args);
PyObject *py_gptq_dense(PyObject *self, PyObject *args);
PyObject *py_q_blocks(PyObject *self, PyObject *args);
PyObject *py_q_integers(PyObject *self, PyObject *args);
PyObject *py_ct_fp8_channel(PyObject *self, PyObject *args);
PyObject *py_fp8_dense(PyObject *self, PyObject *args);
PyObject *py_fp8_blocks(PyObject *self, PyObject *args);
PyObject *py_ct_fp8_block(PyObject *self, PyObject *args);
PyObject *py_mxfp4_dense(PyObject *self, PyObject *args);
PyObject *py_ct_int_symmetric(PyObject *self, PyObject *args);
PyObject *py_nonfinite(PyObject *self, PyObject *args);
PyObject *py_ct_int_dense(PyObject *self, PyObject *args);
PyObject *py_ct_int_asymmetric(PyObject *self, PyObject *args);
PyObject *py_ct_fp4(PyObject *self, PyObject *args);
PyObject *py_ct_peak(PyObject *self, PyObject *args);
/* mapguard.c */
PyObject *py_guard_map(PyObject *self, PyObject *args);
PyObject *py_unguard_map(PyObject *self, PyObject *args);
PyObject *py_map_faults(PyObject *self, PyObject *args);

#endif
