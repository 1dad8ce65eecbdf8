/* quantkit._kernels: the compiled kernels behind `--backend c` and GGUF Q8_0.

Each kernel gives the bytes of its numpy reference (quantkit/schemes/nf4.py, int8.py, ggml.py): every
value is a float32 and every operation is the reference's, in its order. Build with -ffp-contract=off
(a fused multiply-add rounds once where the reference rounds twice) and never with -ffast-math.
Loops are branch-free so compilers vectorize them.

Inputs are any C-contiguous buffer, read-only ones included: float32 values or bfloat16 bits (uint16).
Outputs are buffers the Python wrapper (quantkit/schemes/native.py) allocates. Each call checks every
length before touching memory, releases the GIL, and splits its work over `threads` pthreads that are
joined before it returns.
*/
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
#define Q8_0_BLOCK 32

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

static void *work(void *arg) {
    job_t *job = arg;
    for (;;) {
        const Py_ssize_t lo = atomic_fetch_add_explicit(&job->next, job->slice, memory_order_relaxed);
        if (lo >= job->count)
            return NULL;
        job->fn(job->ctx, lo, min_size(job->count, lo + job->slice));
    }
}

static void parallel_for(part_fn fn, const void *ctx, Py_ssize_t count, int threads) {
    pthread_t ids[MAX_THREADS];
    int started = 0;
    job_t job = {fn, ctx, count, count / ((Py_ssize_t)threads * 16) + 1, 0};
    while (started < threads - 1 && pthread_create(&ids[started], NULL, work, &job) == 0)
        started++;
    work(&job);
    for (int k = 0; k < started; k++)
        pthread_join(ids[k], NULL);
}

static int thread_count(int requested, Py_ssize_t elements) {
    if (elements < PARALLEL_MIN || requested < 1)
        return 1;
    return requested > MAX_THREADS ? MAX_THREADS : requested;
}

/* ------------------------------------------------------------------------------------------------
   bitsandbytes NF4 / FP4 (nf4.quantize_4bit). The reference finds how many of the 15 midpoints between
   neighbouring code values (in ascending order) a value exceeds, and stores the code at that place in
   the type's order; bitsandbytes' clamp to [-1, 1] first changes nothing, as every midpoint lies inside.
   Full blocks are multiplied by the reciprocal of their absmax, the last, partial block is divided by it,
   floored at 1e-38 (and stored floored). A block holding NaN or infinity gets a NaN absmax, which the
   caller refuses. */

typedef struct {
    const void *src;
    int bf16;
    Py_ssize_t n, blocksize;
    float bounds[15];  /* the midpoints, ascending */
    int32_t steps[16]; /* [0]: the code below every midpoint; [j + 1]: the change in code past midpoint j */
    uint8_t *packed;
    float *absmax;
} quantize_4bit_t;

/* The code of v, counting up the midpoints it exceeds with each one's step (1 for NF4, whose order is
   ascending): no table lookup, so the loop over values vectorizes. */
static inline uint8_t code_of(float v, const float *bounds, const int32_t *steps) {
    int32_t code = steps[0];
    for (int j = 0; j < 15; j++)
        code += v > bounds[j] ? steps[j + 1] : 0;
    return (uint8_t)code;
}

/* Scaled values of src[start, start + count): times the reciprocal of a full block's absmax, or divided by
   a partial block's. */
BODY void scale_run(const void *src, int bf16, Py_ssize_t start, Py_ssize_t count, float scale, int divide,
                    float *values) {
    if (divide)
        for (Py_ssize_t i = 0; i < count; i++)
            values[i] = as_float(load_bits(src, bf16, start + i)) / scale;
    else
        for (Py_ssize_t i = 0; i < count; i++)
            values[i] = as_float(load_bits(src, bf16, start + i)) * scale;
}

/* Two codes a byte, the first in the high nibble; an odd count ends with the code of a padding zero, as
   the reference pads an odd-length tensor. Codes first, in one long loop over many blocks' values (the
   midpoints and steps are loaded once, not once a block), then the packing: faster than both in one. */
static inline void pack_codes(float *values, Py_ssize_t count, const float *bounds, const int32_t *steps, uint8_t *packed) {
    uint8_t codes[TILE + 1];
    values[count] = 0.0f;
    for (Py_ssize_t i = 0; i < count + 1; i++)
        codes[i] = code_of(values[i], bounds, steps);
    for (Py_ssize_t k = 0; k < (count + 1) / 2; k++)
        packed[k] = (uint8_t)((codes[2 * k] << 4) | codes[2 * k + 1]);
}

/* Block pairs [lo, hi): pairs, so that every part starts on a whole byte. Scaled values are gathered in
   `values` (blocks larger than it in pieces) and coded and packed whenever it fills. */
BODY void quantize_4bit_body(const quantize_4bit_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bf16) {
    const void *src = q->src;
    const Py_ssize_t n = q->n, blocksize = q->blocksize;
    const Py_ssize_t last = min_size(2 * hi, (n + blocksize - 1) / blocksize);
    float bounds[15], values[TILE + 1];
    int32_t steps[16];
    memcpy(bounds, q->bounds, sizeof bounds);
    memcpy(steps, q->steps, sizeof steps);
    Py_ssize_t held = 0, tile_start = 2 * lo * blocksize;
    for (Py_ssize_t b = 2 * lo; b < last; b++) {
        const Py_ssize_t start = b * blocksize, count = min_size(blocksize, n - start);
        const uint32_t peak = peak_bits(src, bf16, start, count);
        const float absmax = as_float(peak), floored = absmax > 1e-38f ? absmax : 1e-38f;
        const int full = count == blocksize;
        q->absmax[b] = peak >= EXPONENT ? NAN : full ? absmax : floored;
        const float scale = full ? 1.0f / floored : floored;
        for (Py_ssize_t done = 0; done < count;) {
            const Py_ssize_t take = min_size(count - done, TILE - held);
            scale_run(src, bf16, start + done, take, scale, !full, values + held);
            held += take;
            done += take;
            if (held == TILE) {
                pack_codes(values, held, bounds, steps, q->packed + tile_start / 2);
                tile_start += held;
                held = 0;
            }
        }
    }
    if (held)
        pack_codes(values, held, bounds, steps, q->packed + tile_start / 2);
}

PART(quantize_4bit, quantize_4bit_t)

/* ------------------------------------------------------------------------------------------------
   LLM.int8 (int8.quantize_int8): round to float16 precision, SCB = the row's absmax, codes =
   rint(v * ((1 / SCB) * 127)). A row of zeros, or one whose SCB is infinite or NaN, codes to zeros as
   the reference's 0 * inf and NaN do. */

typedef struct {
    const void *src;
    int bf16;
    Py_ssize_t cols;
    int8_t *codes;
    float *scb;
} quantize_int8_t;

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
    if (magnitude > EXPONENT)
        return (uint16_t)(sign | 0x7C00u | ((bits & 0x7FFFFFu) >> 13) | ((bits & 0x7FE000u) == 0));
    if (magnitude == EXPONENT)
        return (uint16_t)(sign | 0x7C00u);
    if (magnitude < 0x38800000u) /* float16 subnormal or zero: a whole number of 2**-24 */
        return (uint16_t)(sign | (uint32_t)(rounded * 16777216.0f));
    return (uint16_t)(sign | (((magnitude >> 23) - 112) << 10) | ((magnitude >> 13) & 0x3FFu));
}

/* Rows [lo, hi). Rounding is monotonic, so the rounded row's absmax is the rounded raw absmax. */
BODY void quantize_int8_body(const quantize_int8_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bf16) {
    const void *src = q->src;
    const Py_ssize_t cols = q->cols;
    for (Py_ssize_t r = lo; r < hi; r++) {
        const Py_ssize_t start = r * cols;
        int8_t *codes = q->codes + start;
        const float scb = float16_round(peak_bits(src, bf16, start, cols));
        q->scb[r] = scb;
        if (as_bits(scb) == 0 || as_bits(scb) >= EXPONENT) {
            memset(codes, 0, (size_t)cols);
            continue;
        }
        const float factor = (1.0f / scb) * 127.0f;
        for (Py_ssize_t i = 0; i < cols; i++)
            codes[i] = (int8_t)rint_int(float16_round(load_bits(src, bf16, start + i)) * factor);
    }
}

PART(quantize_int8, quantize_int8_t)

/* ------------------------------------------------------------------------------------------------
   4-bit dequantization (nf4.dequantize_range): elements [first, first + count) of a packed tensor as
   table[code] * absmax[block] in float32, stored as float32 or as bfloat16 bits rounded to nearest even. */

typedef struct {
    const uint8_t *packed;
    const float *absmax;
    float table[16];
    Py_ssize_t blocksize, first;
    int bf16;
    void *out;
} dequantize_4bit_t;

/* bfloat16 bits of v, rounded to nearest even; a NaN stays a quiet NaN (as dtypes.bf16_bits). */
static inline uint16_t bf16_bits(float v) {
    const uint32_t bits = as_bits(v);
    const uint16_t rounded = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    return (bits & MAGNITUDE) > EXPONENT ? (uint16_t)((bits >> 16) | 0x40u) : rounded;
}

static inline void store(void *out, int bf16, Py_ssize_t i, uint32_t value) {
    if (bf16)
        ((uint16_t *)out)[i] = (uint16_t)value;
    else
        ((uint32_t *)out)[i] = value;
}

/* Output elements [lo, hi), one block's run at a time through that block's 16 scaled values. */
BODY void dequantize_4bit_body(const dequantize_4bit_t *d, Py_ssize_t lo, Py_ssize_t hi, const int bf16) {
    const uint8_t *packed = d->packed;
    const Py_ssize_t first = d->first, blocksize = d->blocksize;
    void *out = d->out;
    uint32_t value[16];
    for (Py_ssize_t i = lo; i < hi;) {
        const Py_ssize_t block = (first + i) / blocksize, stop = min_size(hi, (block + 1) * blocksize - first);
        for (int k = 0; k < 16; k++) {
            const float v = d->table[k] * d->absmax[block];
            value[k] = bf16 ? bf16_bits(v) : as_bits(v);
        }
        if ((first + i) % 2 && i < stop) { /* a run starting on a low nibble */
            store(out, bf16, i, value[packed[(first + i) / 2] & 15]);
            i++;
        }
        const uint8_t *bytes = packed + (first + i) / 2;
        const Py_ssize_t pairs = (stop - i) / 2;
        for (Py_ssize_t j = 0; j < pairs; j++) {
            store(out, bf16, i + 2 * j, value[bytes[j] >> 4]);
            store(out, bf16, i + 2 * j + 1, value[bytes[j] & 15]);
        }
        i += 2 * pairs;
        if (i < stop) { /* a run ending on a high nibble */
            store(out, bf16, i, value[packed[(first + i) / 2] >> 4]);
            i++;
        }
    }
}

PART(dequantize_4bit, dequantize_4bit_t)

/* ------------------------------------------------------------------------------------------------
   GGUF Q8_0 (ggml._q8_0, llama.cpp's quantize_row_q8_0_ref): blocks of 32, d = absmax / 127, codes =
   roundf(v * (1 / d)) with ties away from zero. Each block is stored as 34 bytes: d as float16 (little
   endian), then the 32 codes. */

typedef struct {
    const void *src;
    int bf16;
    uint8_t *blocks;
} q8_0_t;

/* C's roundf (ties away from zero) for |x| < 2**22: the nearest-even integer to |x|, one further out on an
   exact tie. NaN and infinity give 0, as numpy's cast of the reference's NaN or infinite codes does. */
static inline int8_t round_half_away(float x) {
    const float magnitude = fabsf(x);
    const int32_t even = rint_int(magnitude);
    const int32_t away = even + (magnitude - (float)even == 0.5f);
    const int32_t code = as_bits(x) & SIGN ? -away : away;
    return (int8_t)((as_bits(x) & MAGNITUDE) < EXPONENT ? code : 0);
}

/* Blocks [lo, hi). */
BODY void q8_0_body(const q8_0_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bf16) {
    const void *src = q->src;
    for (Py_ssize_t b = lo; b < hi; b++) {
        const Py_ssize_t start = b * Q8_0_BLOCK;
        const float d = as_float(peak_bits(src, bf16, start, Q8_0_BLOCK)) / 127.0f;
        const float inverse = d != 0.0f ? 1.0f / d : 0.0f;
        const uint16_t scale = float16_bits(d);
        uint8_t *block = q->blocks + b * (Q8_0_BLOCK + 2);
        block[0] = (uint8_t)scale;
        block[1] = (uint8_t)(scale >> 8);
        for (int j = 0; j < Q8_0_BLOCK; j++)
            block[2 + j] = (uint8_t)round_half_away(as_float(load_bits(src, bf16, start + j)) * inverse);
    }
}

PART(q8_0, q8_0_t)

/* ------------------------------------------------------------------------------------------------
   The Python side: buffers in, lengths checked, GIL released around the work. */

static void release(Py_buffer *views, int count) {
    for (int k = 0; k < count; k++)
        PyBuffer_Release(&views[k]);
}

/* Raise ValueError unless the buffer holds exactly `expected` bytes. */
static int check_length(const Py_buffer *view, Py_ssize_t expected, const char *what) {
    if (view->len == expected)
        return 0;
    PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", what, view->len, expected);
    return -1;
}

static PyObject *py_quantize_4bit(PyObject *self, PyObject *args) {
    Py_buffer v[5];
    quantize_4bit_t q;
    int threads;
    if (!PyArg_ParseTuple(args, "y*pny*y*w*w*i", &v[0], &q.bf16, &q.blocksize, &v[1], &v[2], &v[3], &v[4], &threads))
        return NULL;
    const Py_ssize_t item = q.bf16 ? 2 : 4;
    q.n = v[0].len / item;
    q.src = v[0].buf;
    q.packed = v[3].buf;
    q.absmax = v[4].buf;
    if (q.blocksize < 1)
        PyErr_SetString(PyExc_ValueError, "blocksize must be positive");
    else if (v[0].len % item)
        PyErr_SetString(PyExc_ValueError, "input: not a whole number of values");
    if (PyErr_Occurred() || check_length(&v[1], sizeof q.bounds, "bounds") || check_length(&v[2], 16, "order") ||
        check_length(&v[3], (q.n + 1) / 2, "packed") ||
        check_length(&v[4], (q.n + q.blocksize - 1) / q.blocksize * 4, "absmax")) {
        release(v, 5);
        return NULL;
    }
    const uint8_t *order = v[2].buf;
    memcpy(q.bounds, v[1].buf, sizeof q.bounds);
    q.steps[0] = order[0] & 15;
    for (int j = 0; j < 15; j++)
        q.steps[j + 1] = (order[j + 1] & 15) - (order[j] & 15);
    const Py_ssize_t pairs = ((q.n + q.blocksize - 1) / q.blocksize + 1) / 2;
    Py_BEGIN_ALLOW_THREADS
    parallel_for(quantize_4bit_part, &q, pairs, thread_count(threads, q.n));
    Py_END_ALLOW_THREADS
    release(v, 5);
    Py_RETURN_NONE;
}

static PyObject *py_quantize_int8(PyObject *self, PyObject *args) {
    Py_buffer v[3];
    quantize_int8_t q;
    int threads;
    if (!PyArg_ParseTuple(args, "y*pnw*w*i", &v[0], &q.bf16, &q.cols, &v[1], &v[2], &threads))
        return NULL;
    const Py_ssize_t rows = v[2].len / 4, item = q.bf16 ? 2 : 4;
    q.src = v[0].buf;
    q.codes = v[1].buf;
    q.scb = v[2].buf;
    if (q.cols < 0)
        PyErr_SetString(PyExc_ValueError, "cols must not be negative");
    if (PyErr_Occurred() || check_length(&v[2], rows * 4, "scb") || check_length(&v[0], rows * q.cols * item, "input") ||
        check_length(&v[1], rows * q.cols, "codes")) {
        release(v, 3);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    parallel_for(quantize_int8_part, &q, rows, thread_count(threads, rows * q.cols));
    Py_END_ALLOW_THREADS
    release(v, 3);
    Py_RETURN_NONE;
}

static PyObject *py_dequantize_4bit(PyObject *self, PyObject *args) {
    Py_buffer v[4];
    dequantize_4bit_t d;
    int threads;
    if (!PyArg_ParseTuple(args, "y*y*y*nnpw*i", &v[0], &v[1], &v[2], &d.blocksize, &d.first, &d.bf16, &v[3], &threads))
        return NULL;
    const Py_ssize_t count = v[3].len / (d.bf16 ? 2 : 4), end = d.first + count;
    d.packed = v[0].buf;
    d.absmax = v[1].buf;
    d.out = v[3].buf;
    if (d.blocksize < 1 || d.first < 0)
        PyErr_SetString(PyExc_ValueError, "blocksize must be positive and first not negative");
    else if (v[0].len < (end + 1) / 2 || v[1].len / 4 < (end + d.blocksize - 1) / d.blocksize)
        PyErr_Format(PyExc_ValueError, "elements up to %zd need %zd packed bytes and %zd absmax values, got %zd and %zd",
                     end, (end + 1) / 2, (end + d.blocksize - 1) / d.blocksize, v[0].len, v[1].len / 4);
    if (PyErr_Occurred() || check_length(&v[2], sizeof d.table, "table")) {
        release(v, 4);
        return NULL;
    }
    memcpy(d.table, v[2].buf, sizeof d.table);
    Py_BEGIN_ALLOW_THREADS
    parallel_for(dequantize_4bit_part, &d, count, thread_count(threads, count));
    Py_END_ALLOW_THREADS
    release(v, 4);
    Py_RETURN_NONE;
}

static PyObject *py_q8_0(PyObject *self, PyObject *args) {
    Py_buffer v[2];
    q8_0_t q;
    int threads;
    if (!PyArg_ParseTuple(args, "y*pw*i", &v[0], &q.bf16, &v[1], &threads))
        return NULL;
    const Py_ssize_t item = q.bf16 ? 2 : 4, blocks = v[0].len / (item * Q8_0_BLOCK);
    q.src = v[0].buf;
    q.blocks = v[1].buf;
    if (check_length(&v[0], blocks * item * Q8_0_BLOCK, "input (whole blocks of 32)") ||
        check_length(&v[1], blocks * (Q8_0_BLOCK + 2), "blocks")) {
        release(v, 2);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    parallel_for(q8_0_part, &q, blocks, thread_count(threads, blocks * Q8_0_BLOCK));
    Py_END_ALLOW_THREADS
    release(v, 2);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"quantize_4bit", py_quantize_4bit, METH_VARARGS,
     "quantize_4bit(src, bf16, blocksize, bounds, order, packed, absmax, threads): NF4/FP4 codes and absmax"},
    {"quantize_int8", py_quantize_int8, METH_VARARGS,
     "quantize_int8(src, bf16, cols, codes, scb, threads): LLM.int8 codes and SCB, row by row"},
    {"dequantize_4bit", py_dequantize_4bit, METH_VARARGS,
     "dequantize_4bit(packed, absmax, table, blocksize, first, bf16, out, threads): elements first.. into out"},
    {"q8_0", py_q8_0, METH_VARARGS, "q8_0(src, bf16, blocks, threads): GGUF Q8_0 blocks of 34 bytes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "quantkit's compiled kernels", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
