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
