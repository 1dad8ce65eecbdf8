/* compressed-tensors and FP8: FP8_DYNAMIC weights (one float8_e4m3fn scale per output row), the bytes of
schemes.fp8_channel in quantkit/methods/ct/. Each step is the reference's torch step in the weight's dtype S:
scale = R(absmax / 448) (0 -> finfo(S).eps), code = e4m3(clamp(R(w / scale), +-448)), R rounding a float32
result to S (bfloat16, float16, or nothing for float32). Further down, each in a section of its own: FP8
weights back to dense (both layouts), FP8 in blocks (the fine-grained writer and FP8_BLOCK, on the same steps
per block), W4A16 / W8A16, and gpt-oss MXFP4 back to dense. */
#include "common.h"

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

/* finfo(S).eps, what a zero scale becomes. */
static inline float finfo_eps(const int dtype) {
    return dtype == S_BF16 ? 0.0078125f : dtype == S_F16 ? 0.0009765625f : 1.1920928955078125e-07f;
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

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FP8_ROW_AVX2 1

/* e4m3(round_to(v, S_BF16)) on 8 lanes, each step the scalar one's */
__attribute__((target("avx2"))) static inline __m256i e4m3_of_bf16_avx2(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v), magnitude_mask = _mm256_set1_epi32((int)MAGNITUDE);
    const __m256i exponent = _mm256_set1_epi32((int)EXPONENT);
    /* round_to: nearest even into bfloat16, NaN kept quiet */
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd);
    rounded = _mm256_and_si256(rounded, _mm256_set1_epi32((int)0xFFFF0000u));
    const __m256i nan_in = _mm256_cmpgt_epi32(_mm256_and_si256(bits, magnitude_mask), exponent);
    const __m256i b = _mm256_blendv_epi8(rounded, _mm256_or_si256(bits, _mm256_set1_epi32(0x400000)), nan_in);
    /* e4m3: normal codes by integer rounding, small ones (below 2**-6) as rint(a * 512), saturation, NaN */
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(b, 24), _mm256_set1_epi32(0x80));
    const __m256i magnitude = _mm256_and_si256(b, magnitude_mask);
    const __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3C800000), magnitude); /* a < 0.015625 */
    __m256i normal = _mm256_sub_epi32(magnitude, _mm256_set1_epi32(120 << 23));
    normal = _mm256_add_epi32(normal, _mm256_set1_epi32(0x7FFFF));
    normal = _mm256_add_epi32(normal, _mm256_and_si256(_mm256_srli_epi32(magnitude, 20), _mm256_set1_epi32(1)));
    normal = _mm256_srli_epi32(normal, 20);
    const __m256 scaled = _mm256_mul_ps(_mm256_castsi256_ps(magnitude), _mm256_set1_ps(512.0f));
    const __m256i subnormal = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(scaled, _mm256_set1_ps(12582912.0f))),
                                               _mm256_set1_epi32(0x4B400000));
    __m256i code = _mm256_blendv_epi8(normal, subnormal, small);
    code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7E), _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x43E00000))); /* a > 448 */
    return _mm256_blendv_epi8(_mm256_or_si256(code, sign), _mm256_set1_epi32(0x7F), _mm256_cmpgt_epi32(magnitude, exponent));
}

/* fp8_channel_body's inner loop for one bfloat16 row, 32 values a step, written out in AVX2 intrinsics: the
   compiler's version of that loop spills most of its registers and runs at half the speed. Returns how many
   values it did (a multiple of 32); the scalar loop does the rest. */
__attribute__((target("avx2"))) static Py_ssize_t fp8_row_bf16_avx2(const uint16_t *src, Py_ssize_t n, float scale, uint8_t *codes) {
    const __m256 divisor = _mm256_set1_ps(scale);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    Py_ssize_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i c[4];
        for (int k = 0; k < 4; k++) {
            const __m256i raw = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i + 8 * k)));
            c[k] = e4m3_of_bf16_avx2(_mm256_div_ps(_mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)), divisor));
        }
        const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(c[0], c[1]), _mm256_packus_epi32(c[2], c[3]));
        _mm256_storeu_si256((__m256i *)(codes + i), _mm256_permutevar8x32_epi32(bytes, order));
    }
    return i;
}
#endif

BODY void fp8_channel_body(const fp8_channel_t *q, Py_ssize_t lo, Py_ssize_t hi, const int dtype) {
    /* locals, not q->...: a store through uint8_t* may alias *q, and reloading its fields each element
       stops the loop from vectorizing */
    const void *src = q->src;
    const Py_ssize_t cols = q->cols;
    const int bf16 = dtype == S_BF16;
    const float eps = finfo_eps(dtype);
    for (Py_ssize_t row = lo; row < hi; row++) {
        const Py_ssize_t start = row * cols;
        float scale = round_to(as_float(peak_bits(src, bf16, start, cols)) / 448.0f, dtype);
        scale = scale == 0.0f ? eps : scale;
        q->scale[row] = scale;
        uint8_t *codes = q->codes + start;
        Py_ssize_t done = 0;
#ifdef FP8_ROW_AVX2
        if (dtype == S_BF16 && simd_avx2())
            done = fp8_row_bf16_avx2((const uint16_t *)src + start, cols, scale, codes);
#endif
        /* the clamp to +-448 is e4m3's saturation; NaN stays NaN */
        for (Py_ssize_t i = done; i < cols; i++)
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

/* ------------------------------------------------------------------------------------------------
   FP8 in blocks of block_rows x block_cols (ragged at the edges), one unit of work a band of block rows:
   each block's peak amax = max |w|, its scale, then its codes. Two writers share it:
   - fine-grained FP8 (fp8/blocks.py quantize_band, transformers' Fp8Quantize): scale = (1 / amax) * 448 in
     float32 (two roundings, as torch computes 448 / amax; 1 for an all-zero block), stored as scale_inv =
     1 / scale, and code = e4m3(w * scale);
   - compressed-tensors FP8_BLOCK (schemes.fp8_block): scale = R(amax / 448) (0 -> finfo(S).eps), stored as
     it is, and code = e4m3(R(w / scale)), ct_fp8_channel's steps on a block instead of a row.
   e4m3 saturates at 448: the references' clamp. A NaN or infinity anywhere is reported (the caller refuses
   the tensor, or takes the reference), not coded. */

typedef struct {
    const void *src; /* bfloat16 bits, or float32 values */
    int bf16;
    int ct;          /* -1: fine-grained; else compressed-tensors, the weight's dtype S */
    Py_ssize_t rows, cols, block_rows, block_cols;
    uint8_t *codes;
    float *scales;   /* [bands, ceil(cols / block_cols)]: scale_inv (fine-grained) or scale (compressed-tensors) */
    atomic_int nonfinite;
} fp8_blocks_t;

BODY void fp8_blocks_body(fp8_blocks_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bf16, const int ct) {
    const void *src = q->src;
    const Py_ssize_t cols = q->cols, width = q->block_cols, grid = (cols + width - 1) / width;
    float scales[4096]; /* per column block of the band; grid <= 4096 is checked at the entry */
    uint32_t peaks[4096];
    for (Py_ssize_t band = lo; band < hi; band++) {
        const Py_ssize_t first = band * q->block_rows, last = min_size(q->rows, first + q->block_rows);
        memset(peaks, 0, sizeof peaks[0] * grid);
        for (Py_ssize_t row = first; row < last; row++)
            for (Py_ssize_t block = 0; block < grid; block++) {
                const Py_ssize_t start = block * width;
                const uint32_t peak = peak_bits(src, bf16, row * cols + start, min_size(width, cols - start));
                peaks[block] = peak > peaks[block] ? peak : peaks[block];
            }
        for (Py_ssize_t block = 0; block < grid; block++) {
            if (peaks[block] >= EXPONENT)
                atomic_store_explicit(&q->nonfinite, 1, memory_order_relaxed);
            const float amax = as_float(peaks[block]);
            if (ct < 0) {
                scales[block] = amax > 0.0f ? (1.0f / amax) * 448.0f : 1.0f;
                q->scales[band * grid + block] = 1.0f / scales[block];
            } else {
                const float scale = round_to(amax / 448.0f, ct);
                scales[block] = scale == 0.0f ? finfo_eps(ct) : scale;
                q->scales[band * grid + block] = scales[block];
            }
        }
        for (Py_ssize_t row = first; row < last; row++)
            for (Py_ssize_t block = 0; block < grid; block++) {
                const Py_ssize_t start = block * width, base = row * cols + start, count = min_size(width, cols - start);
                const float scale = scales[block];
                uint8_t *codes = q->codes;
                if (ct < 0)
                    for (Py_ssize_t i = 0; i < count; i++)
                        codes[base + i] = e4m3(as_float(load_bits(src, bf16, base + i)) * scale);
                else
                    for (Py_ssize_t i = 0; i < count; i++)
                        codes[base + i] = e4m3(round_to(as_float(load_bits(src, bf16, base + i)) / scale, ct));
            }
    }
}

HOT static void fp8_blocks_part(const void *ctx, Py_ssize_t lo, Py_ssize_t hi) {
    fp8_blocks_t *q = (fp8_blocks_t *)ctx;
    if (q->ct == S_BF16)
        fp8_blocks_body(q, lo, hi, 1, S_BF16);
    else if (q->ct == S_F16)
        fp8_blocks_body(q, lo, hi, 0, S_F16);
    else if (q->ct == S_F32)
        fp8_blocks_body(q, lo, hi, 0, S_F32);
    else if (q->bf16)
        fp8_blocks_body(q, lo, hi, 1, -1);
    else
        fp8_blocks_body(q, lo, hi, 0, -1);
}

/* The tail of fp8_blocks and ct_fp8_block, once their arguments are parsed into q and v: check the buffers,
   run over the bands without the GIL, and answer whether every value was finite. */
static PyObject *run_blocks(fp8_blocks_t *q, Py_buffer *v, int threads) {
    q->src = v[0].buf;
    q->codes = v[1].buf;
    q->scales = v[2].buf;
    atomic_init(&q->nonfinite, 0);
    const Py_ssize_t item = q->bf16 ? 2 : 4;
    if (q->cols < 1 || q->block_rows < 1 || q->block_cols < 1 || (q->cols + q->block_cols - 1) / q->block_cols > 4096 ||
        v[0].len % (q->cols * item)) {
        PyErr_SetString(PyExc_ValueError, "cols, block_rows and block_cols must be positive, at most 4096 blocks a row, "
                                          "and src whole rows");
        release(v, 3);
        return NULL;
    }
    q->rows = v[0].len / (q->cols * item);
    const Py_ssize_t bands = (q->rows + q->block_rows - 1) / q->block_rows, grid = (q->cols + q->block_cols - 1) / q->block_cols;
    if (check_length(&v[1], q->rows * q->cols, "codes") || check_length(&v[2], bands * grid * 4, "scales")) {
        release(v, 3);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    parallel_for(fp8_blocks_part, q, bands, thread_count(threads, q->rows * q->cols));
    Py_END_ALLOW_THREADS
    release(v, 3);
    return PyBool_FromLong(!atomic_load(&q->nonfinite));
}

/* fp8_blocks(src, bf16, cols, block_rows, block_cols, codes, scale_inv, threads) -> whether every value was
   finite: src [rows, cols] bfloat16 bits or float32, codes uint8 [rows, cols], scale_inv float32
   [ceil(rows / block_rows), ceil(cols / block_cols)]. */
PyObject *py_fp8_blocks(PyObject *self, PyObject *args) {
    Py_buffer v[3];
    fp8_blocks_t q;
    int threads;
    if (!PyArg_ParseTuple(args, "y*pnnnw*w*i", &v[0], &q.bf16, &q.cols, &q.block_rows, &q.block_cols, &v[1], &v[2], &threads))
        return NULL;
    q.ct = -1;
    return run_blocks(&q, v, threads);
}

/* ct_fp8_block(src, dtype, cols, block_rows, block_cols, codes, scale, threads) -> whether every value was
   finite: dtype as ct_fp8_channel's; codes uint8 [rows, cols], scale float32 [ceil(rows / block_rows),
   ceil(cols / block_cols)] holding values of S. */
PyObject *py_ct_fp8_block(PyObject *self, PyObject *args) {
    Py_buffer v[3];
    fp8_blocks_t q;
    int threads;
    if (!PyArg_ParseTuple(args, "y*innnw*w*i", &v[0], &q.ct, &q.cols, &q.block_rows, &q.block_cols, &v[1], &v[2], &threads))
        return NULL;
    if (q.ct < S_BF16 || q.ct > S_F32) {
        PyErr_SetString(PyExc_ValueError, "dtype must be one of 0, 1, 2");
        release(v, 3);
        return NULL;
    }
    q.bf16 = q.ct == S_BF16;
    return run_blocks(&q, v, threads);
}

/* ------------------------------------------------------------------------------------------------
   W4A16 / W8A16 (schemes.int_symmetric + pack_int32): per group of a row, scale = round_S(absmax / q)
   with q = (2**bits - 1) / 2 (0 -> finfo(S).eps), code = rint(clamp(round_S(w / scale), -2**(bits-1),
   2**(bits-1) - 1)), stored + 2**(bits-1) and packed lowest first into int32 words along the row. A group
   holding NaN or infinity is reported, and the caller takes the reference for the chunk. */

static inline float clamp(float v, float low, float high) {
    return as_float(pick(when(v < low), as_bits(low), pick(when(v > high), as_bits(high), as_bits(v))));
}

/* The peak of a group (peak_bits), flagging NaN or infinity in `nonfinite`. */
static inline uint32_t checked_peak(const void *src, int bf16, Py_ssize_t start, Py_ssize_t count, atomic_int *nonfinite) {
    const uint32_t peak = peak_bits(src, bf16, start, count);
    if (peak >= EXPONENT)
        atomic_store_explicit(nonfinite, 1, memory_order_relaxed);
    return peak;
}

/* The tail of the quantizers' entry points: run over the rows without the GIL, release the buffers, and
   answer whether every value was finite. */
static PyObject *run_rows(part_fn fn, const void *q, Py_ssize_t rows, Py_ssize_t cols, int threads, Py_buffer *views, int count,
                          atomic_int *nonfinite) {
    Py_BEGIN_ALLOW_THREADS
    parallel_for(fn, q, rows, thread_count(threads, rows * cols));
    Py_END_ALLOW_THREADS
    release(views, count);
    return PyBool_FromLong(!atomic_load(nonfinite));
}

typedef struct {
    const void *src;
    int dtype, bits;
    Py_ssize_t cols, group;
    uint32_t *packed;
    float *scale;
    atomic_int nonfinite;
} int_symmetric_t;

BODY void int_symmetric_body(int_symmetric_t *q, Py_ssize_t lo, Py_ssize_t hi, const int dtype, const int bits) {
    const void *src = q->src;
    const Py_ssize_t cols = q->cols, group = q->group, groups = cols / group, per_word = 32 / bits;
    const int bf16 = dtype == S_BF16;
    const float eps = finfo_eps(dtype);
    const float half_range = bits == 4 ? 7.5f : 127.5f, low = -(float)(1 << (bits - 1)), high = (float)((1 << (bits - 1)) - 1);
    const int32_t offset = 1 << (bits - 1);
    uint8_t stored[4096]; /* one group's codes; group <= 4096 is checked at the entry */
    for (Py_ssize_t row = lo; row < hi; row++)
        for (Py_ssize_t g = 0; g < groups; g++) {
            const Py_ssize_t start = row * cols + g * group;
            const uint32_t peak = checked_peak(src, bf16, start, group, &q->nonfinite);
            float scale = round_to(as_float(peak) / half_range, dtype);
            scale = scale == 0.0f ? eps : scale;
            q->scale[row * groups + g] = scale;
            for (Py_ssize_t i = 0; i < group; i++) {
                const float v = round_to(as_float(load_bits(src, bf16, start + i)) / scale, dtype);
                stored[i] = (uint8_t)(rint_int(clamp(v, low, high)) + offset);
            }
            pack_words(stored, group, bits, q->packed + start / per_word);  /* stored fields: codes + 2**(bits-1) */
        }
}

HOT static void int_symmetric_part(const void *ctx, Py_ssize_t lo, Py_ssize_t hi) {
    int_symmetric_t *q = (int_symmetric_t *)ctx;
    if (q->bits == 4)
        q->dtype == S_BF16 ? int_symmetric_body(q, lo, hi, S_BF16, 4) : int_symmetric_body(q, lo, hi, q->dtype, 4);
    else
        q->dtype == S_BF16 ? int_symmetric_body(q, lo, hi, S_BF16, 8) : int_symmetric_body(q, lo, hi, q->dtype, 8);
}

/* ValueError (and 1) unless the arguments of ct_int_symmetric / ct_int_asymmetric fit together. */
static int int_group_invalid(int dtype, int bits, Py_ssize_t group, Py_ssize_t cols, Py_ssize_t item, Py_ssize_t src_len) {
    if (dtype >= S_BF16 && dtype <= S_F32 && (bits == 4 || bits == 8) && group >= 1 && group <= 4096 && cols >= 1 &&
        group % (32 / bits) == 0 && cols % group == 0 && src_len % (cols * item) == 0)
        return 0;
    PyErr_SetString(PyExc_ValueError, "dtype 0, 1 or 2, bits 4 or 8, a group of whole words dividing cols (at most 4096), "
                                      "src whole rows");
    return 1;
}

/* ct_int_symmetric(src, dtype, cols, group, bits, packed, scale, threads) -> whether every value was finite:
   dtype as ct_fp8_channel's, bits 4 or 8, group a multiple of 32 / bits dividing cols; packed int32
   [rows, cols * bits / 32], scale float32 [rows, cols / group]. */
PyObject *py_ct_int_symmetric(PyObject *self, PyObject *args) {
    Py_buffer v[3];
    int_symmetric_t q;
    int threads;
    if (!PyArg_ParseTuple(args, "y*inniw*w*i", &v[0], &q.dtype, &q.cols, &q.group, &q.bits, &v[1], &v[2], &threads))
        return NULL;
    atomic_init(&q.nonfinite, 0);
    const Py_ssize_t item = q.dtype == S_BF16 ? 2 : 4;
    if (int_group_invalid(q.dtype, q.bits, q.group, q.cols, item, v[0].len)) {
        release(v, 3);
        return NULL;
    }
    const Py_ssize_t rows = v[0].len / (q.cols * item);
    q.src = v[0].buf;
    q.packed = v[1].buf;
    q.scale = v[2].buf;
    if (check_length(&v[1], rows * q.cols * q.bits / 8, "packed") || check_length(&v[2], rows * (q.cols / q.group) * 4, "scale")) {
        release(v, 3);
        return NULL;
    }
    return run_rows(int_symmetric_part, &q, rows, q.cols, threads, v, 3, &q.nonfinite);
}

/* ------------------------------------------------------------------------------------------------
   gpt-oss MXFP4 experts back to dense (mxfp4/blocks.py dequantize_groups, then transposed): one expert's
   blocks uint8 [rows, groups, 16] (two e2m1 values a byte, low nibble first) and e8m0 scales [rows, groups]
   give dense [groups * 32, rows]: value = e2m1 * 2**(scale - 127) in float32, exact (code 255 is
   torch.ldexp's 2**128, applied in two exact steps), then stored as the output dtype. One unit of work is one
   group: 32 output rows, each written in order along the expert's rows. */

#define MX_TILE 64 /* expert rows decoded at a time: their bytes turned around so that each loop runs along rows */

/* e2m1 code (bit 3 the sign) -> float32 bits, branch-free: 0 and 0.5 (codes 0, 1), else 2**(e - 1) * (1 + m / 2). */
static inline uint32_t e2m1_bits(uint32_t code) {
    const uint32_t magnitude = code & 7u, sign = (code & 8u) << 28;
    const uint32_t normal = (((magnitude >> 1) + 126u) << 23) | ((magnitude & 1u) << 22);
    return sign | pick(when(magnitude < 2u), pick(when(magnitude == 1u), 0x3F000000u, 0u), normal);
}

typedef struct {
    const uint8_t *blocks, *scales;
    Py_ssize_t rows, groups, first_group;
    int out;
    void *dense;
} mxfp4_dense_t;

BODY void mxfp4_dense_body(const mxfp4_dense_t *q, Py_ssize_t lo, Py_ssize_t hi, const int out) {
    const Py_ssize_t rows = q->rows, groups = q->groups;
    void *dense = q->dense;
    uint8_t bytes[16][MX_TILE];
    float scale[MX_TILE], twice[MX_TILE];
    for (Py_ssize_t unit = lo; unit < hi; unit++) {
        const Py_ssize_t group = q->first_group + unit;
        for (Py_ssize_t r0 = 0; r0 < rows; r0 += MX_TILE) {
            const Py_ssize_t count = min_size(MX_TILE, rows - r0);
            for (Py_ssize_t r = 0; r < count; r++) {
                const uint8_t *from = q->blocks + ((r0 + r) * groups + group) * 16;
                for (int b = 0; b < 16; b++)
                    bytes[b][r] = from[b];
                const uint32_t code = q->scales[(r0 + r) * groups + group];
                /* code 0 is 2**-127 (a float32 subnormal), 255 torch.ldexp's 2**128 as 2**127 then 2 */
                scale[r] = code == 0 ? as_float(0x00400000u) : code == 255 ? 0x1p127f : as_float(code << 23);
                twice[r] = code == 255 ? 2.0f : 1.0f;
            }
            for (int j = 0; j < 32; j++) {
                const uint8_t *column = bytes[j >> 1];
                const int shift = (j & 1) * 4;
                const Py_ssize_t base = (unit * 32 + j) * rows + r0;
                for (Py_ssize_t r = 0; r < count; r++)
                    store(dense, out != S_F32, base + r, dense_bits(as_float(e2m1_bits((uint32_t)(column[r] >> shift))) * scale[r] * twice[r], out));
            }
        }
    }
}

HOT static void mxfp4_dense_part(const void *ctx, Py_ssize_t lo, Py_ssize_t hi) {
    const mxfp4_dense_t *q = ctx;
    if (q->out == S_BF16)
        mxfp4_dense_body(q, lo, hi, S_BF16);
    else if (q->out == S_F16)
        mxfp4_dense_body(q, lo, hi, S_F16);
    else
        mxfp4_dense_body(q, lo, hi, S_F32);
}

/* mxfp4_dense(blocks, scales, groups, first_group, out, dense, threads): blocks uint8 [rows, groups, 16] and
   scales uint8 [rows, groups] of one expert; dense [count * 32, rows] for groups first_group.. (count from
   its length) in out (0 bfloat16, 1 float16, 2 float32). */
PyObject *py_mxfp4_dense(PyObject *self, PyObject *args) {
    Py_buffer v[3];
    mxfp4_dense_t q;
    int threads;
    if (!PyArg_ParseTuple(args, "y*y*nniw*i", &v[0], &v[1], &q.groups, &q.first_group, &q.out, &v[2], &threads))
        return NULL;
    q.blocks = v[0].buf;
    q.scales = v[1].buf;
    q.dense = v[2].buf;
    const Py_ssize_t item = q.out == S_F32 ? 4 : 2;
    if (q.groups < 1 || q.first_group < 0 || q.out < S_BF16 || q.out > S_F32 || v[1].len % q.groups || v[0].len != v[1].len * 16) {
        PyErr_SetString(PyExc_ValueError, "groups positive, first_group not negative, out 0, 1 or 2, blocks 16 bytes per scale");
        release(v, 3);
        return NULL;
    }
    q.rows = v[1].len / q.groups;
    const Py_ssize_t count = q.rows ? v[2].len / (32 * q.rows * item) : 0;
    if (q.first_group + count > q.groups || check_length(&v[2], count * 32 * q.rows * item, "dense")) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "dense: more groups than the blocks hold");
        release(v, 3);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    parallel_for(mxfp4_dense_part, &q, count, thread_count(threads, count * 32 * q.rows));
    Py_END_ALLOW_THREADS
    release(v, 3);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------
   Integer and fp4 compressed-tensors weights back to dense (ct/formats.py decode on pack-quantized,
   int-quantized, nvfp4- and mxfp4-pack-quantized codes): value = round_S(round_S(q - round_S(zero)) * scale)
   in float32, then stored as the output dtype. q is the stored field minus 2**(bits-1) (pack-quantized: fields
   of 4 or 8 bits, lowest first in int32 words along the row), an int8 code (int-quantized), or the e2m1 value
   of a nibble (the fp4 formats, whose bytes hold the low nibble first: little-endian words of 4 bits, with
   S bfloat16, which holds every e2m1 value). Scales and zero points share fp8_dense's
   grid: the entry of element (r, c) is at [(first_row + r) / block_rows][c / block_cols]. A row is unpacked a
   tile at a time into floats, then each block's run of it scaled. */

/* A stored field as a float: its e2m1 value, or the integer less the offset. */
static inline float field_value(uint32_t field, const int e2m1, const float offset) {
    return e2m1 ? as_float(e2m1_bits(field)) : (float)(int32_t)field - offset;
}

typedef struct {
    const void *codes; /* uint32 words [rows, words] or int8 [rows, cols] */
    const float *scales, *zeros; /* zeros NULL: symmetric */
    Py_ssize_t cols, words, scale_cols, block_rows, block_cols, first_row;
    int bits; /* 4 or 8: packed; 0: int8 codes */
    int e2m1; /* bits 4: the nibbles are e2m1 codes */
    int round, out;
    void *dense;
} int_dense_t;

BODY void int_dense_body(const int_dense_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bits, const int e2m1, const int round,
                         const int out) {
    const Py_ssize_t cols = q->cols, width = q->block_cols;
    void *dense = q->dense;
    const float offset = bits ? (float)(1 << (bits - 1)) : 0.0f;
    float values[TILE];
    for (Py_ssize_t row = lo; row < hi; row++) {
        const Py_ssize_t grid_row = (q->first_row + row) / q->block_rows * q->scale_cols;
        const float *scales = q->scales + grid_row, *zeros = q->zeros ? q->zeros + grid_row : NULL;
        for (Py_ssize_t t0 = 0; t0 < cols; t0 += TILE) {
            const Py_ssize_t count = min_size(TILE, cols - t0);
            if (bits == 0) {
                const int8_t *codes = (const int8_t *)q->codes + row * cols + t0;
                for (Py_ssize_t i = 0; i < count; i++)
                    values[i] = (float)codes[i];
            } else {
                /* TILE is a multiple of every word's fields, so a tile starts on a word */
                const int per_word = 32 / bits;
                const uint32_t mask = (1u << bits) - 1u;
                const uint32_t *words = (const uint32_t *)q->codes + row * q->words + t0 / per_word;
                const Py_ssize_t whole = count / per_word;
                for (Py_ssize_t w = 0; w < whole; w++)
                    for (int k = 0; k < per_word; k++)
                        values[w * per_word + k] = field_value((words[w] >> (k * bits)) & mask, e2m1, offset);
                for (Py_ssize_t i = whole * per_word; i < count; i++)
                    values[i] = field_value((words[i / per_word] >> (i % per_word * bits)) & mask, e2m1, offset);
            }
            /* each block's run within the tile */
            for (Py_ssize_t i = 0; i < count;) {
                const Py_ssize_t c = t0 + i, block = c / width, run = min_size(count - i, (block + 1) * width - c);
                const float scale = scales[block];
                const Py_ssize_t base = row * cols + c;
                if (zeros) {
                    const float zero = round_to(zeros[block], round);
                    for (Py_ssize_t k = 0; k < run; k++) {
                        const float shifted = round_to(round_to(values[i + k], round) - zero, round);
                        store(dense, out != S_F32, base + k, dense_bits(round_to(shifted * scale, round), out));
                    }
                } else
                    for (Py_ssize_t k = 0; k < run; k++)
                        store(dense, out != S_F32, base + k, dense_bits(round_to(round_to(values[i + k], round) * scale, round), out));
                i += run;
            }
        }
    }
}

HOT static void int_dense_part(const void *ctx, Py_ssize_t lo, Py_ssize_t hi) {
    const int_dense_t *q = ctx;
    /* the common cases get a loop of their own; the rest share one that tests at run time */
    if (q->e2m1 && q->out == S_BF16)
        int_dense_body(q, lo, hi, 4, 1, S_BF16, S_BF16);
    else if (q->e2m1)
        int_dense_body(q, lo, hi, 4, 1, S_BF16, q->out);
    else if (q->bits == 4 && q->round == S_BF16 && q->out == S_BF16)
        int_dense_body(q, lo, hi, 4, 0, S_BF16, S_BF16);
    else if (q->bits == 8 && q->round == S_BF16 && q->out == S_BF16)
        int_dense_body(q, lo, hi, 8, 0, S_BF16, S_BF16);
    else if (q->bits == 4)
        int_dense_body(q, lo, hi, 4, 0, q->round, q->out);
    else if (q->bits == 8)
        int_dense_body(q, lo, hi, 8, 0, q->round, q->out);
    else
        int_dense_body(q, lo, hi, 0, 0, q->round, q->out);
}

/* ct_int_dense(codes, bits, e2m1, cols, scales, zeros, block_rows, block_cols, first_row, round, out, dense, threads):
   codes int32 words [rows, ceil(cols * bits / 32)] (bits 4 or 8; e2m1: fp4 nibbles, round then bfloat16) or int8
   [rows, cols] (bits 0); scales float32
   [*, ceil(cols / block_cols)] covering scale row (first_row + rows - 1) / block_rows; zeros float32 of the
   scales' shape, or empty (symmetric); round and out 0 bfloat16, 1 float16, 2 float32; dense [rows, cols]. */
PyObject *py_ct_int_dense(PyObject *self, PyObject *args) {
    Py_buffer v[4];
    int_dense_t q;
    int threads;
    if (!PyArg_ParseTuple(args, "y*ipny*y*nnniiw*i", &v[0], &q.bits, &q.e2m1, &q.cols, &v[1], &v[2], &q.block_rows, &q.block_cols,
                          &q.first_row, &q.round, &q.out, &v[3], &threads))
        return NULL;
    q.codes = v[0].buf;
    q.scales = v[1].buf;
    q.zeros = v[2].len ? v[2].buf : NULL;
    q.dense = v[3].buf;
    q.words = q.bits ? (q.cols * q.bits + 31) / 32 : q.cols;
    const Py_ssize_t row_bytes = q.bits ? q.words * 4 : q.cols, item = q.out == S_F32 ? 4 : 2;
    if (q.cols < 1 || (q.bits != 0 && q.bits != 4 && q.bits != 8) || (q.e2m1 && (q.bits != 4 || q.round != S_BF16)) || q.block_rows < 1 || q.block_cols < 1 || q.first_row < 0 ||
        q.round < S_BF16 || q.round > S_F32 || q.out < S_BF16 || q.out > S_F32 || v[0].len % row_bytes) {
        PyErr_SetString(PyExc_ValueError, "cols, block_rows, block_cols positive, bits 0, 4 or 8 (e2m1: 4, round 0), codes whole rows, "
                                          "first_row not negative, round and out one of 0, 1, 2");
        release(v, 4);
        return NULL;
    }
    const Py_ssize_t rows = v[0].len / row_bytes;
    q.scale_cols = (q.cols + q.block_cols - 1) / q.block_cols;
    const Py_ssize_t scale_rows = rows ? (q.first_row + rows - 1) / q.block_rows + 1 : 0;
    if (v[1].len / 4 < scale_rows * q.scale_cols || v[1].len % (4 * q.scale_cols) || (v[2].len && v[2].len != v[1].len))
        PyErr_Format(PyExc_ValueError, "scales: %zd bytes (zeros %zd), expected rows of %zd float32 covering %zd rows", v[1].len,
                     v[2].len, q.scale_cols, scale_rows);
    if (PyErr_Occurred() || check_length(&v[3], rows * q.cols * item, "dense")) {
        release(v, 4);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    parallel_for(int_dense_part, &q, rows, thread_count(threads, rows * q.cols));
    Py_END_ALLOW_THREADS
    release(v, 4);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------
   W4A16_ASYM (schemes.int_asymmetric + pack_int32): per group of a row, low = min(min, 0), high = max(max, 0),
   scale = round_S(round_S(high - low) / (2**bits - 1)), zero = rint(clamp(round_S(qmin - round_S(low / scale)),
   qmin, qmax)) (NaN, from an all-zero group's 0 / 0, -> 0), the scale then 0 -> finfo(S).eps, and
   code = rint(clamp(round_S(round_S(w / scale) + zero), qmin, qmax)), packed as ct_int_symmetric's. A group
   holding NaN or infinity is reported, and the caller takes the reference for the chunk. */

typedef struct {
    const void *src;
    int dtype, bits;
    Py_ssize_t cols, group;
    uint32_t *packed;
    float *scale;
    int8_t *zero;
    atomic_int nonfinite;
} int_asymmetric_t;

BODY void int_asymmetric_body(int_asymmetric_t *q, Py_ssize_t lo, Py_ssize_t hi, const int dtype, const int bits) {
    const void *src = q->src;
    const Py_ssize_t cols = q->cols, group = q->group, groups = cols / group, per_word = 32 / bits;
    const int bf16 = dtype == S_BF16;
    const float eps = finfo_eps(dtype);
    const float range = bits == 4 ? 15.0f : 255.0f, low_code = -(float)(1 << (bits - 1)), high_code = (float)((1 << (bits - 1)) - 1);
    const int32_t offset = 1 << (bits - 1);
    uint8_t stored[4096]; /* one group's codes; group <= 4096 is checked at the entry */
    for (Py_ssize_t row = lo; row < hi; row++)
        for (Py_ssize_t g = 0; g < groups; g++) {
            const Py_ssize_t start = row * cols + g * group;
            checked_peak(src, bf16, start, group, &q->nonfinite);
            float low = 0.0f, high = 0.0f;
            for (Py_ssize_t i = 0; i < group; i++) {
                const float v = as_float(load_bits(src, bf16, start + i));
                low = v < low ? v : low;
                high = v > high ? v : high;
            }
            float scale = round_to(round_to(high - low, dtype) / range, dtype);
            const float shifted_zero = round_to(low_code - round_to(low / scale, dtype), dtype);
            const float zero = shifted_zero != shifted_zero ? 0.0f : (float)rint_int(clamp(shifted_zero, low_code, high_code));
            scale = scale == 0.0f ? eps : scale;
            q->scale[row * groups + g] = scale;
            q->zero[row * groups + g] = (int8_t)zero;
            for (Py_ssize_t i = 0; i < group; i++) {
                const float v = round_to(round_to(as_float(load_bits(src, bf16, start + i)) / scale, dtype) + zero, dtype);
                stored[i] = (uint8_t)(rint_int(clamp(v, low_code, high_code)) + offset);
            }
            pack_words(stored, group, bits, q->packed + start / per_word);  /* stored fields: codes + 2**(bits-1) */
        }
}

HOT static void int_asymmetric_part(const void *ctx, Py_ssize_t lo, Py_ssize_t hi) {
    int_asymmetric_t *q = (int_asymmetric_t *)ctx;
    if (q->bits == 4)
        q->dtype == S_BF16 ? int_asymmetric_body(q, lo, hi, S_BF16, 4) : int_asymmetric_body(q, lo, hi, q->dtype, 4);
    else
        q->dtype == S_BF16 ? int_asymmetric_body(q, lo, hi, S_BF16, 8) : int_asymmetric_body(q, lo, hi, q->dtype, 8);
}

/* ct_int_asymmetric(src, dtype, cols, group, bits, packed, scale, zero, threads) -> whether every value was
   finite: as ct_int_symmetric, and zero int8 [rows, cols / group] (the signed zero points, unpacked). */
PyObject *py_ct_int_asymmetric(PyObject *self, PyObject *args) {
    Py_buffer v[4];
    int_asymmetric_t q;
    int threads;
    if (!PyArg_ParseTuple(args, "y*inniw*w*w*i", &v[0], &q.dtype, &q.cols, &q.group, &q.bits, &v[1], &v[2], &v[3], &threads))
        return NULL;
    atomic_init(&q.nonfinite, 0);
    const Py_ssize_t item = q.dtype == S_BF16 ? 2 : 4;
    if (int_group_invalid(q.dtype, q.bits, q.group, q.cols, item, v[0].len)) {
        release(v, 4);
        return NULL;
    }
    const Py_ssize_t rows = v[0].len / (q.cols * item), groups = rows * (q.cols / q.group);
    q.src = v[0].buf;
    q.packed = v[1].buf;
    q.scale = v[2].buf;
    q.zero = v[3].buf;
    if (check_length(&v[1], rows * q.cols * q.bits / 8, "packed") || check_length(&v[2], groups * 4, "scale") ||
        check_length(&v[3], groups, "zero")) {
        release(v, 4);
        return NULL;
    }
    return run_rows(int_asymmetric_part, &q, rows, q.cols, threads, v, 4, &q.nonfinite);
}

/* ------------------------------------------------------------------------------------------------
   NVFP4A16 and MXFP4A16 (schemes.nvfp4 / schemes.mxfp4, then pack_fp4): per group of a row a scale code and
   e2m1 codes of w over the group's scale, two a byte (the even column in the low nibble). NVFP4 (groups of
   16, global scale g): code = e4m3(g * round_S(absmax / 6)) (0 -> 0x20: 0.125), values w / (e4m3(code) / g)
   in float32, not rounded to S. MXFP4 (groups of 32): absmax rounded to a power of two on S's bits (half an fp4
   mantissa step added, the mantissa dropped), biased = clamp(125 + log2 of it, 0, 255), scale =
   round_S(2**(biased - 127)) (0 -> 1), values round_S(w / scale), the stored code the scale's own biased
   exponent (an infinite scale stores 127, as the reference's int32 cast of -inf does). Values are clamped to
   +-6 and coded nearest even, a negative value that rounds to zero keeping its sign. A group holding NaN or
   infinity is reported, and the caller takes the reference for the chunk. */

typedef struct {
    const void *src;
    int dtype, mx;
    float global;
    Py_ssize_t cols;
    uint8_t *packed, *scale;
    atomic_int nonfinite;
} fp4_t;

/* The e2m1 code of v (fp4_e2m1_codes): the count of thresholds below |v| (ties to even), bit 3 v < 0. */
static inline uint32_t e2m1_code(float v) {
    const float a = fabsf(clamp(v, -6.0f, 6.0f));
    const uint32_t index = (uint32_t)(a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
    return index | ((uint32_t)(v < 0.0f) << 3);
}

/* MXFP4's scale of a group from its absmax (bits of a value of S): (scale as a float32 value of S, stored code). */
static inline float mx_scale(uint32_t peak, const int dtype, uint8_t *code) {
    uint32_t power; /* round_to_power_2 on S's bits, back as float32 bits: 0, a power of two, or infinity */
    if (dtype == S_BF16)
        power = (((peak >> 16) + 0x20u) & ~0x7Fu) << 16;
    else if (dtype == S_F32)
        power = (peak + 0x200000u) & ~0x7FFFFFu;
    else {
        const uint32_t half = ((uint32_t)float16_bits(as_float(peak)) + 0x100u) & ~0x3FFu;
        power = half == 0 ? 0 : half >= 0x7C00u ? EXPONENT : (((half >> 10) + 112u) << 23);
    }
    const int exponent_field = (int)(power >> 23); /* log2 + 127 of a normal power */
    const int biased = power == 0 ? 0 : power >= EXPONENT ? 255 : exponent_field > 2 ? exponent_field - 2 : 0;
    const uint32_t ldexp = biased == 255 ? EXPONENT : biased == 0 ? 0x00400000u : (uint32_t)biased << 23;
    float scale = round_to(as_float(ldexp), dtype);
    scale = scale == 0.0f ? 1.0f : scale;
    const uint32_t bits = as_bits(scale);
    *code = (uint8_t)(bits >= EXPONENT ? 127u : bits >> 23);
    return scale;
}

BODY void fp4_body(fp4_t *q, Py_ssize_t lo, Py_ssize_t hi, const int dtype, const int mx) {
    const void *src = q->src;
    const int bf16 = dtype == S_BF16;
    const Py_ssize_t cols = q->cols, group = mx ? 32 : 16, groups = cols / group;
    const float global = q->global;
    for (Py_ssize_t row = lo; row < hi; row++)
        for (Py_ssize_t g = 0; g < groups; g++) {
            const Py_ssize_t start = row * cols + g * group;
            const uint32_t peak = checked_peak(src, bf16, start, group, &q->nonfinite);
            uint8_t code;
            float divisor;
            if (mx)
                divisor = mx_scale(peak, dtype, &code);
            else {
                code = e4m3(global * round_to(as_float(peak) / 6.0f, dtype));
                code = code == 0 ? 0x20 : code;
                divisor = e4m3_value(code) / global;
            }
            q->scale[row * groups + g] = code;
            /* three passes over the group (scaled, coded, packed), each a loop that vectorizes */
            float values[32];
            uint8_t codes[32];
            for (Py_ssize_t i = 0; i < group; i++) {
                const float v = as_float(load_bits(src, bf16, start + i)) / divisor;
                values[i] = mx ? round_to(v, dtype) : v;
            }
            for (Py_ssize_t i = 0; i < group; i++)
                codes[i] = (uint8_t)e2m1_code(values[i]);
            uint8_t *packed = q->packed + start / 2;
            for (Py_ssize_t i = 0; i < group / 2; i++)
                packed[i] = (uint8_t)(codes[2 * i] | (codes[2 * i + 1] << 4));
        }
}

HOT static void fp4_part(const void *ctx, Py_ssize_t lo, Py_ssize_t hi) {
    fp4_t *q = (fp4_t *)ctx;
    if (q->mx)
        q->dtype == S_BF16 ? fp4_body(q, lo, hi, S_BF16, 1) : fp4_body(q, lo, hi, q->dtype, 1);
    else
        q->dtype == S_BF16 ? fp4_body(q, lo, hi, S_BF16, 0) : fp4_body(q, lo, hi, q->dtype, 0);
}

/* ct_fp4(src, dtype, cols, mx, global_scale, packed, scale, threads) -> whether every value was finite: dtype
   as ct_fp8_channel's; mx 1 MXFP4 (groups of 32), 0 NVFP4 (groups of 16, global_scale g); cols a multiple of
   the group; packed uint8 [rows, cols / 2], scale uint8 codes [rows, cols / group]. */
PyObject *py_ct_fp4(PyObject *self, PyObject *args) {
    Py_buffer v[3];
    fp4_t q;
    int threads;
    if (!PyArg_ParseTuple(args, "y*inpfw*w*i", &v[0], &q.dtype, &q.cols, &q.mx, &q.global, &v[1], &v[2], &threads))
        return NULL;
    atomic_init(&q.nonfinite, 0);
    const Py_ssize_t item = q.dtype == S_BF16 ? 2 : 4, group = q.mx ? 32 : 16;
    if (q.dtype < S_BF16 || q.dtype > S_F32 || q.cols < 1 || q.cols % group || v[0].len % (q.cols * item)) {
        PyErr_SetString(PyExc_ValueError, "dtype 0, 1 or 2, cols a positive multiple of the group, src whole rows");
        release(v, 3);
        return NULL;
    }
    const Py_ssize_t rows = v[0].len / (q.cols * item);
    q.src = v[0].buf;
    q.packed = v[1].buf;
    q.scale = v[2].buf;
    if (check_length(&v[1], rows * q.cols / 2, "packed") || check_length(&v[2], rows * (q.cols / group), "scale")) {
        release(v, 3);
        return NULL;
    }
    return run_rows(fp4_part, &q, rows, q.cols, threads, v, 3, &q.nonfinite);
}

/* ------------------------------------------------------------------------------------------------
   NVFP4's global absmax (schemes.global_absmax): the largest magnitude of a chunk, by its bits (peak_bits), so
   that a NaN anywhere gives a NaN, as numpy's min / max do. Slices of PEAK_SLICE values each keep their own
   peak; the largest of those is the answer. */

#define PEAK_SLICE 65536

typedef struct {
    const void *src;
    int bf16;
    Py_ssize_t count;
    uint32_t *peaks;
} peak_t;

BODY void peak_body(const peak_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bf16) {
    for (Py_ssize_t unit = lo; unit < hi; unit++) {
        const Py_ssize_t start = unit * PEAK_SLICE;
        q->peaks[unit] = peak_bits(q->src, bf16, start, min_size(PEAK_SLICE, q->count - start));
    }
}

PART(peak, peak_t)

/* ct_peak(src, bf16, threads) -> max |value| of bfloat16 bits or float32 values, as a float (NaN if any is). */
PyObject *py_ct_peak(PyObject *self, PyObject *args) {
    Py_buffer v[1];
    peak_t q;
    int threads;
    if (!PyArg_ParseTuple(args, "y*pi", &v[0], &q.bf16, &threads))
        return NULL;
    const Py_ssize_t item = q.bf16 ? 2 : 4, units = (v[0].len / item + PEAK_SLICE - 1) / PEAK_SLICE;
    if (v[0].len % item) {
        PyErr_SetString(PyExc_ValueError, "src: whole values");
        release(v, 1);
        return NULL;
    }
    q.src = v[0].buf;
    q.count = v[0].len / item;
    q.peaks = PyMem_Calloc(units ? units : 1, sizeof(uint32_t));
    if (!q.peaks) {
        release(v, 1);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    parallel_for(peak_part, &q, units, thread_count(threads, q.count));
    Py_END_ALLOW_THREADS
    uint32_t peak = 0;
    for (Py_ssize_t unit = 0; unit < units; unit++)
        peak = q.peaks[unit] > peak ? q.peaks[unit] : peak;
    PyMem_Free(q.peaks);
    release(v, 1);
    return PyFloat_FromDouble((double)as_float(peak));
}
