/* bitsandbytes: NF4 / FP4 quantization, LLM.int8 quantization and 4-bit dequantization, each the bytes of
its numpy reference in quantkit/methods/bnb/ (nf4.py, int8.py). */
#include "common.h"

#define TILE 4096 /* 4-bit: scaled values held before coding and packing; even */

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

PyObject *py_quantize_4bit(PyObject *self, PyObject *args) {
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

PyObject *py_quantize_int8(PyObject *self, PyObject *args) {
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

PyObject *py_dequantize_4bit(PyObject *self, PyObject *args) {
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
