/* GPTQ: group-wise round-to-nearest integers packed into qweight columns, the bytes of
   quantkit/methods/gptq/groupwise.py's reference (plain RTN; `--optimize` runs on numba). */
#include "common.h"

#define GPTQ_BAD_VALUES 1 /* problems[r]: the row holds NaN or infinity */
#define GPTQ_TOO_WIDE 2   /* a group's range does not fit a float16 scale */

typedef struct {
    const void *src;
    int bf16;
    Py_ssize_t cols, size, out_features, col0;
    int bits, sym, min_zero;
    uint32_t *qweight; /* [cols / per_word, out_features] */
    float *scales;     /* [out_features, groups] */
    uint8_t *zeros;    /* [out_features, groups] */
    uint8_t *problems; /* [rows] */
} gptq_t;

/* float16 rounding of span / maxq, floored at the smallest float16 subnormal (groupwise._to_f16). */
static inline float gptq_scale(float span, float maxq) {
    const float scale = float16_round(as_bits(span / maxq));
    return scale > 0x1p-24f ? scale : 0x1p-24f;
}

/* A float's bits as an int32 that orders like the float (for finite values), so that a group's minimum and
   maximum are integer reductions, which vectorize; the map is its own inverse. */
static inline int32_t order_key(uint32_t bits) { return (int32_t)(bits ^ ((uint32_t)((int32_t)bits >> 31) >> 1)); }

/* A group's scale and zero point from its range as groupwise._range takes it, stored in the outputs and
   returned through *scale_out / *zero_out. Returns a problem code or 0. */
BODY int gptq_params(const gptq_t *q, Py_ssize_t row, Py_ssize_t group, const int bf16, const int bits, float *scale_out,
                     int32_t *zero_out) {
    const void *src = q->src;
    const Py_ssize_t start = row * q->cols + group * q->size, size = q->size;
    const int maxq = (1 << bits) - 1;
    const float maxq_f = (float)maxq;
    const uint32_t peak = peak_bits(src, bf16, start, size);
    if (peak >= EXPONENT)
        return GPTQ_BAD_VALUES;
    float lo = 0.0f, hi = 0.0f;
    if (q->sym) {
        hi = as_float(peak);
        lo = -hi;
    } else {
        int32_t low = 0, high = 0; /* the keys of 0.0: the range always spans 0 */
        for (Py_ssize_t i = 0; i < size; i++) {
            const int32_t key = order_key(load_bits(src, bf16, start + i));
            low = key < low ? key : low;
            high = key > high ? key : high;
        }
        lo = as_float((uint32_t)order_key((uint32_t)low));
        hi = as_float((uint32_t)order_key((uint32_t)high));
    }
    if (lo == 0.0f && hi == 0.0f) {
        lo = -1.0f;
        hi = 1.0f;
    }
    if (gptq_scale(hi - lo, maxq_f) > 65504.0f)
        return GPTQ_TOO_WIDE;
    if (!q->sym && q->min_zero) /* a zero point of at least 1 needs at least one step below 0 */
        lo = lo < -hi / (float)(maxq - 1) ? lo : -hi / (float)(maxq - 1);
    const float scale = gptq_scale(hi - lo, maxq_f);
    if (scale > 65504.0f)
        return GPTQ_TOO_WIDE;
    int32_t zero = 1 << (bits - 1);
    if (!q->sym) {
        zero = rint_int(-lo / scale);
        zero = zero < q->min_zero ? q->min_zero : zero;
        zero = zero > maxq ? maxq : zero;
    }
    const Py_ssize_t slot = (q->col0 + row) * (q->cols / size) + group;
    q->scales[slot] = scale;
    q->zeros[slot] = (uint8_t)zero;
    *scale_out = scale;
    *zero_out = zero;
    return 0;
}

/* The codes of src[start, start + n), packed per_word to a word, lowest bits first, into words[0, n / per_word). */
BODY void gptq_words(const void *src, Py_ssize_t start, Py_ssize_t n, float scale, int32_t zero, const int bf16,
                     const int bits, uint32_t *words) {
    const int maxq = (1 << bits) - 1;
    uint8_t codes[TILE];
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t code = rint_int(as_float(load_bits(src, bf16, start + i)) / scale) + zero;
        code = code < 0 ? 0 : code;
        codes[i] = (uint8_t)(code > maxq ? maxq : code);
    }
    pack_words(codes, n, bits, words);
}

/* Rows [lo, hi), GPTQ_ROWS at a time: qweight is [in / per_word, out], so the words of consecutive rows
   are neighbours, and writing a tile's words row of qweight by row of qweight fills whole cache lines.
   One row at a time stored each word out_features * 4 bytes after the last, a stride that maps every
   store of a row to the same few cache sets. A row's first problem stops its remaining groups. */
#define GPTQ_ROWS 16

BODY void gptq_body(const gptq_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bf16, const int bits) {
    const Py_ssize_t groups = q->cols / q->size, size = q->size;
    const int per_word = 32 / bits;
    uint32_t words[GPTQ_ROWS][TILE / 4];
    for (Py_ssize_t r0 = lo; r0 < hi; r0 += GPTQ_ROWS) {
        const Py_ssize_t rows = min_size(GPTQ_ROWS, hi - r0);
        uint8_t problem[GPTQ_ROWS] = {0};
        for (Py_ssize_t g = 0; g < groups; g++) {
            float scale[GPTQ_ROWS];
            int32_t zero[GPTQ_ROWS];
            for (Py_ssize_t r = 0; r < rows; r++)
                if (!problem[r])
                    problem[r] = (uint8_t)gptq_params(q, r0 + r, g, bf16, bits, &scale[r], &zero[r]);
            for (Py_ssize_t t0 = 0; t0 < size; t0 += TILE) {
                const Py_ssize_t n = min_size(TILE, size - t0);
                for (Py_ssize_t r = 0; r < rows; r++) {
                    if (problem[r])
                        memset(words[r], 0, sizeof words[r]);
                    else
                        gptq_words(q->src, (r0 + r) * q->cols + g * size + t0, n, scale[r], zero[r], bf16, bits, words[r]);
                }
                uint32_t *dst = q->qweight + (g * size + t0) / per_word * q->out_features + q->col0 + r0;
                for (Py_ssize_t w = 0; w < n / per_word; w++, dst += q->out_features)
                    for (Py_ssize_t r = 0; r < rows; r++)
                        dst[r] = words[r][w];
            }
        }
        for (Py_ssize_t r = 0; r < rows; r++)
            q->problems[r0 + r] = problem[r];
    }
}

/* The body inlined once per input type and width, so that every loop has constant trip counts and shifts. */
HOT static void gptq_part(const void *ctx, Py_ssize_t lo, Py_ssize_t hi) {
    const gptq_t *q = ctx;
    if (q->bf16) {
        if (q->bits == 4)
            gptq_body(q, lo, hi, 1, 4);
        else if (q->bits == 8)
            gptq_body(q, lo, hi, 1, 8);
        else
            gptq_body(q, lo, hi, 1, 2);
    } else {
        if (q->bits == 4)
            gptq_body(q, lo, hi, 0, 4);
        else if (q->bits == 8)
            gptq_body(q, lo, hi, 0, 8);
        else
            gptq_body(q, lo, hi, 0, 2);
    }
}

PyObject *py_gptq_rtn(PyObject *self, PyObject *args) {
    Py_buffer v[5];
    gptq_t q;
    Py_ssize_t rows;
    int threads;
    if (!PyArg_ParseTuple(args, "y*pnnniiinnw*w*w*w*i", &v[0], &q.bf16, &rows, &q.cols, &q.size, &q.bits, &q.sym,
                          &q.min_zero, &q.out_features, &q.col0, &v[1], &v[2], &v[3], &v[4], &threads))
        return NULL;
    const Py_ssize_t item = q.bf16 ? 2 : 4, groups = q.size > 0 ? q.cols / q.size : 0;
    if (q.bits != 2 && q.bits != 4 && q.bits != 8) {
        release(v, 5);
        PyErr_Format(PyExc_ValueError, "bits: %d, expected 2, 4 or 8", q.bits);
        return NULL;
    }
    if (q.size <= 0 || q.cols % q.size || q.size % (32 / q.bits) || q.col0 < 0 || q.col0 + rows > q.out_features) {
        release(v, 5);
        PyErr_SetString(PyExc_ValueError, "group size, row count or first column do not fit the output");
        return NULL;
    }
    q.src = v[0].buf;
    q.qweight = v[1].buf;
    q.scales = v[2].buf;
    q.zeros = v[3].buf;
    q.problems = v[4].buf;
    if (check_length(&v[0], rows * q.cols * item, "input") ||
        check_length(&v[1], q.cols / (32 / q.bits) * q.out_features * 4, "qweight") ||
        check_length(&v[2], q.out_features * groups * 4, "scales") || check_length(&v[3], q.out_features * groups, "zeros") ||
        check_length(&v[4], rows, "problems")) {
        release(v, 5);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    parallel_for(gptq_part, &q, rows, thread_count(threads, rows * q.cols));
    Py_END_ALLOW_THREADS
    release(v, 5);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------
   GPTQ codes <-> signed integers (methods/gptq/integers.py, api.IntegerBlocks), for lossless transcoding:
   q[o, i] = code - mid where the group's zero point is mid = 2**(bits-1), and mid - 1 - code = ~(code - mid)
   where it is mid - 1 (`turned`: the factor is then the scale negated). qweight is [in / per_word, out],
   per_word codes of one column to a word, lowest bits first; q is [out, in]. Work is split by output
   columns, a tile of them at a time, so that each qweight row is read in runs and q rows written in runs. */

#define SIGNED_TILE 32

typedef struct {
    uint32_t *qweight;     /* [in / per_word, out] */
    const uint8_t *turned; /* [out, groups]: 1 where the zero point is mid - 1 */
    int8_t *q;             /* [out, in] */
    Py_ssize_t in, out, group;
    int bits, bf16;        /* bf16: unused (the PART switch) */
    int pack;              /* 1: q -> qweight; 0: qweight -> q */
} gptq_signed_t;

BODY void gptq_signed_width(const gptq_signed_t *t, Py_ssize_t lo, Py_ssize_t hi, const int bits) {
    const int per_word = 32 / bits, mid = 1 << (bits - 1);
    const uint32_t maxq = (1u << bits) - 1;
    const Py_ssize_t groups = t->in / t->group, words = t->in / per_word;
    for (Py_ssize_t o0 = lo; o0 < hi; o0 += SIGNED_TILE) {
        const Py_ssize_t o1 = min_size(o0 + SIGNED_TILE, hi);
        for (Py_ssize_t r = 0; r < words; r++) {
            const Py_ssize_t i0 = r * per_word, g = i0 / t->group;
            uint32_t *row = t->qweight + r * t->out;
            for (Py_ssize_t o = o0; o < o1; o++) {
                const int32_t flip = -(int32_t)t->turned[o * groups + g];
                int8_t *q = t->q + o * t->in + i0;
                if (t->pack) {
                    uint32_t word = 0;
                    for (int k = 0; k < per_word; k++)
                        word |= ((uint32_t)(((int32_t)q[k] ^ flip) + mid) & maxq) << (bits * k);
                    row[o] = word;
                } else {
                    const uint32_t word = row[o];
                    for (int k = 0; k < per_word; k++)
                        q[k] = (int8_t)(((int32_t)((word >> (bits * k)) & maxq) - mid) ^ flip);
                }
            }
        }
    }
}

BODY void gptq_signed_body(const gptq_signed_t *t, Py_ssize_t lo, Py_ssize_t hi, const int unused) {
    (void)unused;
    if (t->bits == 4)
        gptq_signed_width(t, lo, hi, 4);
    else if (t->bits == 8)
        gptq_signed_width(t, lo, hi, 8);
    else
        gptq_signed_width(t, lo, hi, 2);
}

PART(gptq_signed, gptq_signed_t)

/* Both directions: v[0] qweight ([in / per_word, out] uint32), v[1] turned, v[2] q ([out, in] int8); the one
   written (q when unpacking, qweight when packing) is a new array from the Python wrapper. */
static PyObject *gptq_signed(Py_buffer *v, gptq_signed_t *t, int threads) {
    const int per_word = t->bits > 0 ? 32 / t->bits : 1;
    if ((t->bits != 2 && t->bits != 4 && t->bits != 8) || t->group <= 0 || t->group % per_word || t->in % t->group ||
        t->out < 0) {
        release(v, 3);
        PyErr_SetString(PyExc_ValueError, "bits must be 2, 4 or 8, the group a multiple of 32 / bits dividing the inputs");
        return NULL;
    }
    if (check_length(&v[0], t->in / per_word * t->out * 4, "qweight") ||
        check_length(&v[1], t->out * (t->in / t->group), "turned") || check_length(&v[2], t->out * t->in, "q")) {
        release(v, 3);
        return NULL;
    }
    t->qweight = v[0].buf;
    t->turned = v[1].buf;
    t->q = v[2].buf;
    Py_BEGIN_ALLOW_THREADS
    parallel_for(gptq_signed_part, t, t->out, thread_count(threads, t->out * t->in));
    Py_END_ALLOW_THREADS
    release(v, 3);
    Py_RETURN_NONE;
}

PyObject *py_gptq_unpack_signed(PyObject *self, PyObject *args) {
    Py_buffer v[3];
    gptq_signed_t t = {0};
    int threads;
    if (!PyArg_ParseTuple(args, "y*y*innnw*i", &v[0], &v[1], &t.bits, &t.group, &t.in, &t.out, &v[2], &threads))
        return NULL;
    return gptq_signed(v, &t, threads);
}

PyObject *py_gptq_pack_signed(PyObject *self, PyObject *args) {
    Py_buffer v[3];
    gptq_signed_t t = {0};
    int threads;
    if (!PyArg_ParseTuple(args, "y*y*innnw*i", &v[2], &v[1], &t.bits, &t.group, &t.in, &t.out, &v[0], &threads))
        return NULL;
    t.pack = 1;
    return gptq_signed(v, &t, threads);
}

/* ------------------------------------------------------------------------------------------------
   GPTQ back to dense, output rows first_row.. of the [out, in] weight: layout.dequantize_gptq's float32
   ((float)code - (float)zero) * scale, two roundings, no fused multiply-add, then stored as the output dtype
   (nearest even, as dtypes.from_float32). zero = the stored qzeros field + offset (1 for v1, as
   layout.zero_points), group g_idx[i] (act-order included). Each row first gathers its groups' zero points and
   scales into a table of its own; then GPTQ_DENSE_ROWS rows at a time read GPTQ_DENSE_WORDS rows of qweight
   (a few KB, held in L1 for the whole tile): a row's codes unpacked into bytes, then its values computed
   and written in one run, a group's run at a time where g_idx has no act-order (a loop that vectorizes).
   AWQ GEMM (layout.dequantize_awq) the same way: 4-bit, qweight [in, out / 8] and qzeros packed along
   output features, column c of a word in nibble AWQ_SLOT[c], zero points as stored, g_idx i / group_size. */

#define GPTQ_DENSE_ROWS 16
#define GPTQ_DENSE_INPUTS 512 /* a multiple of every per_word */

static const int AWQ_SLOT[8] = {0, 4, 1, 5, 2, 6, 3, 7}; /* the inverse of layout.AWQ_ORDER */

typedef struct {
    const uint32_t *qweight; /* GPTQ [in / per_word, out], AWQ [in, out / 8] */
    const uint32_t *qzeros;  /* [groups, out / per_word], columns packed as in qweight */
    const float *scales;     /* [groups, out] */
    const int32_t *g_idx;    /* [in], each in [0, groups) */
    float *table;            /* [rows, groups, 2]: zero point and scale */
    Py_ssize_t in, out, groups, first_row;
    int bits, awq, offset, dtype;
    Py_ssize_t run; /* g_idx[i] = i / run for every i (no act-order), or 0 */
    void *dense;    /* [rows, in]: bfloat16 / float16 bits or float32 */
} gptq_dense_t;

BODY void gptq_dense_body(const gptq_dense_t *t, Py_ssize_t lo, Py_ssize_t hi, const int bits, const int awq, const int dtype) {
    const int per_word = 32 / bits;
    const uint32_t maxq = (1u << bits) - 1;
    const Py_ssize_t in = t->in, out = t->out, groups = t->groups, run = t->run;
    const int32_t *g_idx = t->g_idx;
    void *dense = t->dense;
    uint8_t codes[GPTQ_DENSE_INPUTS];
    for (Py_ssize_t r = lo; r < hi; r++) {
        const Py_ssize_t o = t->first_row + r;
        const int shift = awq ? 4 * AWQ_SLOT[o % 8] : bits * (int)(o % per_word);
        float *table = t->table + r * groups * 2;
        for (Py_ssize_t g = 0; g < groups; g++) {
            table[2 * g] = (float)(int32_t)(((t->qzeros[g * (out / per_word) + o / per_word] >> shift) & maxq) + (uint32_t)t->offset);
            table[2 * g + 1] = t->scales[g * out + o];
        }
    }
    for (Py_ssize_t r0 = lo; r0 < hi; r0 += GPTQ_DENSE_ROWS) {
        const Py_ssize_t r1 = min_size(r0 + GPTQ_DENSE_ROWS, hi);
        for (Py_ssize_t i0 = 0; i0 < in; i0 += GPTQ_DENSE_INPUTS) {
            const Py_ssize_t i1 = min_size(i0 + GPTQ_DENSE_INPUTS, in);
            for (Py_ssize_t r = r0; r < r1; r++) {
                const Py_ssize_t o = t->first_row + r, base = r * in;
                const float *table = t->table + r * groups * 2;
                if (awq) {
                    const uint32_t *column = t->qweight + o / 8;
                    const int shift = 4 * AWQ_SLOT[o % 8];
                    for (Py_ssize_t i = i0; i < i1; i++)
                        codes[i - i0] = (uint8_t)((column[i * (out / 8)] >> shift) & 15u);
                } else {
                    const uint32_t *column = t->qweight + o;
                    for (Py_ssize_t w = i0 / per_word; w < i1 / per_word; w++) {
                        const uint32_t word = column[w * out];
                        for (int k = 0; k < per_word; k++)
                            codes[w * per_word + k - i0] = (uint8_t)((word >> (bits * k)) & maxq);
                    }
                }
                if (run) /* runs of inputs in one group: its zero point and scale once a run */
                    for (Py_ssize_t s = i0, e; s < i1; s = e) {
                        const Py_ssize_t g = s / run;
                        e = min_size((g + 1) * run, i1);
                        const float zero = table[2 * g], scale = table[2 * g + 1];
                        for (Py_ssize_t i = s; i < e; i++) {
                            const float centred = (float)codes[i - i0] - zero;
                            store(dense, dtype != S_F32, base + i, dense_bits(centred * scale, dtype));
                        }
                    }
                else
                    for (Py_ssize_t i = i0; i < i1; i++) {
                        const float *zs = table + 2 * (Py_ssize_t)g_idx[i];
                        const float centred = (float)codes[i - i0] - zs[0];
                        store(dense, dtype != S_F32, base + i, dense_bits(centred * zs[1], dtype));
                    }
            }
        }
    }
}

/* Inlined once per layout, width and output dtype: constant shifts and stores. */
#define GPTQ_DENSE_WIDTHS(t, lo, hi, dtype)          \
    do {                                             \
        if ((t)->awq)                                \
            gptq_dense_body(t, lo, hi, 4, 1, dtype); \
        else if ((t)->bits == 4)                     \
            gptq_dense_body(t, lo, hi, 4, 0, dtype); \
        else if ((t)->bits == 8)                     \
            gptq_dense_body(t, lo, hi, 8, 0, dtype); \
        else                                         \
            gptq_dense_body(t, lo, hi, 2, 0, dtype); \
    } while (0)

HOT static void gptq_dense_part(const void *ctx, Py_ssize_t lo, Py_ssize_t hi) {
    const gptq_dense_t *t = ctx;
    if (t->dtype == S_BF16)
        GPTQ_DENSE_WIDTHS(t, lo, hi, S_BF16);
    else if (t->dtype == S_F16)
        GPTQ_DENSE_WIDTHS(t, lo, hi, S_F16);
    else
        GPTQ_DENSE_WIDTHS(t, lo, hi, S_F32);
}

/* gptq_dense(qweight, qzeros, scales, g_idx, bits, awq, offset, in, out, groups, first_row, dtype, dense, threads):
   qweight int32 [in / per_word, out] (AWQ, bits 4: [in, out / 8]), qzeros int32 [groups, out / per_word], scales
   float32 [groups, out], g_idx int32 [in]; offset 1 (GPTQ v1) or 0; dtype 0 bfloat16, 1 float16, 2 float32;
   dense [rows, in] of it, rows first_row.. of the weight. */
PyObject *py_gptq_dense(PyObject *self, PyObject *args) {
    Py_buffer v[5];
    gptq_dense_t t;
    int threads;
    if (!PyArg_ParseTuple(args, "y*y*y*y*ipinnnniw*i", &v[0], &v[1], &v[2], &v[3], &t.bits, &t.awq, &t.offset, &t.in, &t.out,
                          &t.groups, &t.first_row, &t.dtype, &v[4], &threads))
        return NULL;
    const int per_word = t.bits > 0 && t.bits <= 32 ? 32 / t.bits : 1;
    if ((t.bits != 2 && t.bits != 4 && t.bits != 8) || (t.awq && t.bits != 4) || (t.offset != 0 && t.offset != 1) || t.in < 1 ||
        (!t.awq && t.in % per_word) || t.out < 1 || t.out % per_word || t.groups < 1 || t.first_row < 0 || t.dtype < S_BF16 ||
        t.dtype > S_F32) {
        release(v, 5);
        PyErr_SetString(PyExc_ValueError, "bits must be 2, 4 or 8 (AWQ 4), offset 0 or 1, out (GPTQ: and in) a positive "
                                          "multiple of 32 / bits, groups positive, first_row not negative, dtype one of 0, 1, 2");
        return NULL;
    }
    const Py_ssize_t item = t.dtype == S_F32 ? 4 : 2, rows = v[4].len / (item * t.in);
    if (check_length(&v[0], (t.awq ? t.in * (t.out / per_word) : t.in / per_word * t.out) * 4, "qweight") ||
        check_length(&v[1], t.groups * (t.out / per_word) * 4, "qzeros") || check_length(&v[2], t.groups * t.out * 4, "scales") ||
        check_length(&v[3], t.in * 4, "g_idx") || check_length(&v[4], rows * t.in * item, "dense")) {
        release(v, 5);
        return NULL;
    }
    t.qweight = v[0].buf;
    t.qzeros = v[1].buf;
    t.scales = v[2].buf;
    t.g_idx = v[3].buf;
    t.dense = v[4].buf;
    t.run = t.in;
    for (Py_ssize_t i = 0; i < t.in && t.run == t.in; i++)
        t.run = t.g_idx[i] ? i : t.in; /* where group 0 ends, if it is the first of equal runs */
    for (Py_ssize_t i = 0; i < t.in; i++) {
        if (t.g_idx[i] < 0 || t.g_idx[i] >= t.groups) {
            release(v, 5);
            PyErr_Format(PyExc_ValueError, "g_idx[%zd] = %d is outside the %zd groups", i, t.g_idx[i], t.groups);
            return NULL;
        }
        t.run = t.run && t.g_idx[i] == i / t.run ? t.run : 0;
    }
    if (t.first_row + rows > t.out) {
        release(v, 5);
        PyErr_Format(PyExc_ValueError, "rows %zd.. %zd: the weight has %zd", t.first_row, t.first_row + rows, t.out);
        return NULL;
    }
    t.table = PyMem_RawMalloc((size_t)(rows * t.groups * 2) * sizeof(float) + 1);
    if (!t.table) {
        release(v, 5);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    parallel_for(gptq_dense_part, &t, rows, thread_count(threads, rows * t.in));
    Py_END_ALLOW_THREADS
    PyMem_RawFree(t.table);
    release(v, 5);
    Py_RETURN_NONE;
}
