/* compressed-tensors: FP8_DYNAMIC weights (one float8_e4m3fn scale per output row), the bytes of
schemes.fp8_channel in quantkit/methods/ct/. Each step is the reference's torch step in the weight's dtype S:
scale = R(absmax / 448) (0 -> finfo(S).eps), code = e4m3(clamp(R(w / scale), +-448)), R rounding a float32
result to S (bfloat16, float16, or nothing for float32). */
#include "common.h"

enum { S_BF16 = 0, S_F16 = 1, S_F32 = 2 };

typedef struct {
    const void *src; /* bfloat16 bits, or float32 values (float16 sources widened) */
    int dtype;
    Py_ssize_t cols;
    uint8_t *codes;
    float *scale;
} fp8_channel_t;

/* Branch-free pieces (a ?: on floats can become a branch, and a loop with one does not vectorize):
   `when(c)` is all ones where c holds, and `pick` blends two bit patterns through it. */
static inline uint32_t when(int condition) { return -(uint32_t)(condition != 0); }
static inline uint32_t pick(uint32_t mask, uint32_t a, uint32_t b) { return (a & mask) | (b & ~mask); }

/* A float32 result rounded to S, as a float32 (bfloat16: nearest even, NaN kept quiet; float16: as
   float16_round, whose result for a value that rounds to zero loses a sign torch keeps). */
static inline float round_to(float v, const int dtype) {
    const uint32_t bits = as_bits(v);
    if (dtype == S_BF16) {
        const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
        return as_float(pick(when((bits & MAGNITUDE) > EXPONENT), bits | 0x400000u, rounded));
    }
    if (dtype == S_F16)
        return as_float(as_bits(float16_round(bits)) | (bits & SIGN));
    return v;
}

/* float32 -> float8_e4m3fn as torch casts: nearest even (subnormals in steps of 2**-9), the sign of zero
   kept, saturating at 448, NaN -> 0x7F. */
static inline uint8_t e4m3(float v) {
    const uint32_t bits = as_bits(v), sign = (bits >> 24) & 0x80u, magnitude = bits & MAGNITUDE;
    const float a = as_float(magnitude);
    const uint32_t small = when(a < 0.015625f);
    const uint32_t normal = (magnitude - (120u << 23) + 0x7FFFFu + ((magnitude >> 20) & 1u)) >> 20;
    const uint32_t subnormal = (uint32_t)rint_int(as_float(small & as_bits(a * 512.0f)));
    uint32_t code = pick(small, subnormal, normal);
    code = pick(when(a > 448.0f), 0x7Eu, code);
    return (uint8_t)pick(when(magnitude > EXPONENT), 0x7Fu, code | sign);
}

BODY void fp8_channel_body(const fp8_channel_t *q, Py_ssize_t lo, Py_ssize_t hi, const int dtype) {
    /* locals, not q->...: a store through uint8_t* may alias *q, and reloading its fields each element
       stops the loop from vectorizing */
    const void *src = q->src;
    const Py_ssize_t cols = q->cols;
    const int bf16 = dtype == S_BF16;
    const float eps = dtype == S_BF16 ? 0.0078125f : dtype == S_F16 ? 0.0009765625f : 1.1920928955078125e-07f;
    for (Py_ssize_t row = lo; row < hi; row++) {
        const Py_ssize_t start = row * cols;
        float scale = round_to(as_float(peak_bits(src, bf16, start, cols)) / 448.0f, dtype);
        scale = scale == 0.0f ? eps : scale;
        q->scale[row] = scale;
        uint8_t *codes = q->codes + start;
        /* the clamp to +-448 is e4m3's saturation; NaN stays NaN */
        for (Py_ssize_t i = 0; i < cols; i++)
            codes[i] = e4m3(round_to(as_float(load_bits(src, bf16, start + i)) / scale, dtype));
    }
}

HOT static void fp8_channel_part(const void *ctx, Py_ssize_t lo, Py_ssize_t hi) {
    const fp8_channel_t *q = ctx;
    if (q->dtype == S_BF16)
        fp8_channel_body(q, lo, hi, S_BF16);
    else if (q->dtype == S_F16)
        fp8_channel_body(q, lo, hi, S_F16);
    else
        fp8_channel_body(q, lo, hi, S_F32);
}

/* ct_fp8_channel(src, dtype, cols, codes, scale, threads): dtype 0 bfloat16 bits, 1 float16 and 2 float32
   (both as float32 values); codes uint8 [rows, cols], scale float32 [rows]. */
PyObject *py_ct_fp8_channel(PyObject *self, PyObject *args) {
    Py_buffer v[3];
    fp8_channel_t q;
    int threads;
    if (!PyArg_ParseTuple(args, "y*inw*w*i", &v[0], &q.dtype, &q.cols, &v[1], &v[2], &threads))
        return NULL;
    const Py_ssize_t rows = v[2].len / 4, item = q.dtype == S_BF16 ? 2 : 4;
    q.src = v[0].buf;
    q.codes = v[1].buf;
    q.scale = v[2].buf;
    if (q.cols < 0 || q.dtype < S_BF16 || q.dtype > S_F32)
        PyErr_SetString(PyExc_ValueError, "cols must not be negative and dtype one of 0, 1, 2");
    if (PyErr_Occurred() || check_length(&v[2], rows * 4, "scale") || check_length(&v[0], rows * q.cols * item, "input") ||
        check_length(&v[1], rows * q.cols, "codes")) {
        release(v, 3);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    parallel_for(fp8_channel_part, &q, rows, thread_count(threads, rows * q.cols));
    Py_END_ALLOW_THREADS
    release(v, 3);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------
   FP8 weights back to dense: fine-grained FP8 (`weight_scale_inv` per 128 x 128 block, float32) and
   compressed-tensors float-quantized (a scale per tensor, row or block, in the checkpoint's dtype S).
   Each value is the references' (fp8/blocks.py dequantize_band, ct/formats.py affine):
   round_S(e4m3(code) * scale) in float32, then stored as the output dtype (nearest even). One layout
   covers every strategy: the scale of element (r, c) is scales[(first_row + r) / block_rows][c / block_cols]. */

/* float8_e4m3fn code -> float32 bits, exactly: normal codes re-biased (7 -> 127), subnormals m * 2**-9
   computed (not left as float32 subnormals, whose arithmetic is slow), 0x7F / 0xFF the NaN the numpy
   table holds (0x7FC00000, sign dropped). */
static inline float e4m3_value(uint8_t code) {
    const uint32_t c = code, sign = (c & 0x80u) << 24, magnitude = c & 0x7Fu;
    const uint32_t normal = (magnitude << 20) + (120u << 23);
    const uint32_t subnormal = as_bits((float)(int32_t)(c & 7u) * 0.001953125f);
    const uint32_t bits = pick(when(magnitude < 8u), subnormal, normal) | sign;
    return as_float(pick(when(magnitude == 0x7Fu), 0x7FC00000u, bits));
}

typedef struct {
    const uint8_t *codes;
    const float *scales;
    Py_ssize_t cols, scale_cols, block_rows, block_cols, first_row;
    int round; /* S: S_BF16, S_F16 or S_F32 (no rounding) */
    int out;   /* the output dtype, the same codes */
    void *dense;
} fp8_dense_t;

/* The output dtype's bits of a float32 that is already a value of S (or any float32 for S_F32). */
static inline uint32_t dense_bits(float v, const int out) {
    if (out == S_BF16)
        return bf16_bits(v);
    if (out == S_F16)
        return float16_bits(v);
    return as_bits(v);
}

BODY void fp8_dense_body(const fp8_dense_t *q, Py_ssize_t lo, Py_ssize_t hi, const int round, const int out) {
    const uint8_t *codes = q->codes;
    const Py_ssize_t cols = q->cols, width = q->block_cols;
    void *dense = q->dense;
    for (Py_ssize_t row = lo; row < hi; row++) {
        const float *scales = q->scales + (q->first_row + row) / q->block_rows * q->scale_cols;
        for (Py_ssize_t start = 0, block = 0; start < cols; start += width, block++) {
            const float scale = scales[block];
            const Py_ssize_t base = row * cols + start, count = min_size(width, cols - start);
            for (Py_ssize_t i = 0; i < count; i++)
                store(dense, out != S_F32, base + i, dense_bits(round_to(e4m3_value(codes[base + i]) * scale, round), out));
        }
    }
}

HOT static void fp8_dense_part(const void *ctx, Py_ssize_t lo, Py_ssize_t hi) {
    const fp8_dense_t *q = ctx;
    /* the common pairs get a loop of their own; the rest share one that tests at run time */
    if (q->round == S_F32 && q->out == S_BF16)
        fp8_dense_body(q, lo, hi, S_F32, S_BF16);
    else if (q->round == S_BF16 && q->out == S_BF16)
        fp8_dense_body(q, lo, hi, S_BF16, S_BF16);
    else if (q->round == S_F16 && q->out == S_F16)
        fp8_dense_body(q, lo, hi, S_F16, S_F16);
    else
        fp8_dense_body(q, lo, hi, q->round, q->out);
}

/* fp8_dense(codes, cols, scales, block_rows, block_cols, first_row, round, out, dense, threads): codes uint8
   [rows, cols]; scales float32 [*, ceil(cols / block_cols)] holding at least scale row
   (first_row + rows - 1) / block_rows; round and out 0 bfloat16, 1 float16, 2 float32; dense the output
   [rows, cols] (2-byte bits or float32). */
PyObject *py_fp8_dense(PyObject *self, PyObject *args) {
    Py_buffer v[3];
    fp8_dense_t q;
    int threads;
    if (!PyArg_ParseTuple(args, "y*ny*nnniiw*i", &v[0], &q.cols, &v[1], &q.block_rows, &q.block_cols, &q.first_row, &q.round,
                          &q.out, &v[2], &threads))
        return NULL;
    q.codes = v[0].buf;
    q.scales = v[1].buf;
    q.dense = v[2].buf;
    if (q.cols < 1 || q.block_rows < 1 || q.block_cols < 1 || q.first_row < 0 || q.round < S_BF16 || q.round > S_F32 ||
        q.out < S_BF16 || q.out > S_F32 || v[0].len % q.cols) {
        PyErr_SetString(PyExc_ValueError, "cols, block_rows, block_cols must be positive (cols dividing the codes), "
                                          "first_row not negative, round and out one of 0, 1, 2");
        release(v, 3);
        return NULL;
    }
    const Py_ssize_t rows = v[0].len / q.cols, item = q.out == S_F32 ? 4 : 2;
    q.scale_cols = (q.cols + q.block_cols - 1) / q.block_cols;
    const Py_ssize_t scale_rows = rows ? (q.first_row + rows - 1) / q.block_rows + 1 : 0;
    if (v[1].len / 4 < scale_rows * q.scale_cols || v[1].len % (4 * q.scale_cols))
        PyErr_Format(PyExc_ValueError, "scales: %zd bytes, expected rows of %zd float32 covering %zd rows", v[1].len, q.scale_cols,
                     scale_rows);
    if (PyErr_Occurred() || check_length(&v[2], rows * q.cols * item, "dense")) {
        release(v, 3);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    parallel_for(fp8_dense_part, &q, rows, thread_count(threads, rows * q.cols));
    Py_END_ALLOW_THREADS
    release(v, 3);
    Py_RETURN_NONE;
}
