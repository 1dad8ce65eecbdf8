/* GGUF: Q8_0 and Q4_0 blocks, the bytes of quantkit/methods/gguf/legacy.py's references, and Q4_0 / Q8_0 codes
   moved to and from signed integers. */
#include "common.h"

#define Q8_0_BLOCK 32

/* ------------------------------------------------------------------------------------------------
   GGUF Q8_0 (legacy._q8_0, llama.cpp's quantize_row_q8_0_ref): blocks of 32, d = absmax / 127, codes =
   roundf(v * (1 / d)) with ties away from zero. Each block is stored as 34 bytes: d as float16 (little
   endian), then the 32 codes. */

typedef struct {
    const void *src;
    int bf16;
    uint8_t *blocks;
    atomic_long *bad; /* Q4_0: blocks holding NaN or infinity */
} legacy_t;

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
BODY void q8_0_body(const legacy_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bf16) {
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

PART(q8_0, legacy_t)

/* The legacy entry points: (src, bf16, blocks, threads), each block of 32 inputs stored in `size` bytes;
   returns the count of blocks holding NaN or infinity (Q4_0 counts them, Q8_0 codes them itself). */
static PyObject *legacy_blocks(PyObject *args, part_fn part, Py_ssize_t size) {
    Py_buffer v[2];
    legacy_t q;
    int threads;
    atomic_long bad = 0;
    if (!PyArg_ParseTuple(args, "y*pw*i", &v[0], &q.bf16, &v[1], &threads))
        return NULL;
    const Py_ssize_t item = q.bf16 ? 2 : 4, blocks = v[0].len / (item * Q8_0_BLOCK);
    q.src = v[0].buf;
    q.blocks = v[1].buf;
    q.bad = &bad;
    if (check_length(&v[0], blocks * item * Q8_0_BLOCK, "input (whole blocks of 32)") ||
        check_length(&v[1], blocks * size, "blocks")) {
        release(v, 2);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    parallel_for(part, &q, blocks, thread_count(threads, blocks * Q8_0_BLOCK));
    Py_END_ALLOW_THREADS
    release(v, 2);
    return PyLong_FromLong(atomic_load(&bad));
}

PyObject *py_q8_0(PyObject *self, PyObject *args) { return legacy_blocks(args, q8_0_part, Q8_0_BLOCK + 2); }

/* ------------------------------------------------------------------------------------------------
   GGUF Q4_0 (legacy._q4_0, llama.cpp's quantize_row_q4_0_ref): blocks of 32, max = the value of largest
   magnitude (the first on ties), d = max / -8, codes min(15, trunc(v * (1 / d) + 8.5)), stored as 18 bytes:
   d as float16, then 16 bytes whose low nibbles hold codes 0..15 and high nibbles codes 16..31. A block
   holding NaN or infinity is left to the numpy reference (`bad` counts them): its codes come from casts of
   NaN whose result C leaves undefined. */

BODY void q4_0_body(const legacy_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bf16) {
    const void *src = q->src;
    long bad = 0;
    for (Py_ssize_t b = lo; b < hi; b++) {
        const Py_ssize_t start = b * Q8_0_BLOCK;
        uint32_t peak = load_bits(src, bf16, start), amax = peak & MAGNITUDE; /* all zeros: the first one's sign */
        for (int j = 1; j < Q8_0_BLOCK; j++) {
            const uint32_t bits = load_bits(src, bf16, start + j), magnitude = bits & MAGNITUDE;
            peak = magnitude > amax ? bits : peak;
            amax = magnitude > amax ? magnitude : amax;
        }
        bad += amax >= EXPONENT;
        const float d = as_float(peak) / -8.0f;
        const float inverse = d != 0.0f ? 1.0f / d : 0.0f;
        const uint16_t scale = float16_bits(d);
        uint8_t *block = q->blocks + b * (2 + Q8_0_BLOCK / 2);
        block[0] = (uint8_t)scale;
        block[1] = (uint8_t)(scale >> 8);
        uint8_t codes[Q8_0_BLOCK];
        for (int j = 0; j < Q8_0_BLOCK; j++) {
            const float x = as_float(load_bits(src, bf16, start + j)) * inverse + 8.5f;
            const int32_t code = x >= 0.0f && x < 16.0f ? (int32_t)x : 15; /* non-finite blocks are redone */
            codes[j] = (uint8_t)code;
        }
        for (int j = 0; j < Q8_0_BLOCK / 2; j++)
            block[2 + j] = (uint8_t)(codes[j] | (codes[j + Q8_0_BLOCK / 2] << 4));
    }
    if (bad)
        atomic_fetch_add_explicit(q->bad, bad, memory_order_relaxed);
}

PART(q4_0, legacy_t)

PyObject *py_q4_0(PyObject *self, PyObject *args) { return legacy_blocks(args, q4_0_part, 2 + Q8_0_BLOCK / 2); }

/* ------------------------------------------------------------------------------------------------
   Q4_0 / Q8_0 <-> signed integers and float16 factors (legacy.blocks_of / integers_of, api.IntegerBlocks):
   blocks of 32 values q * d, stored as d's float16 bits then the codes: Q8_0 the 32 int8 as they are, Q4_0
   16 bytes whose low nibbles hold q[0..15] + 8 and high nibbles q[16..31] + 8. Moving codes, no arithmetic. */

typedef struct {
    int8_t *q;       /* [blocks * 32] */
    uint16_t *d;     /* [blocks] float16 bits */
    uint8_t *blocks; /* [blocks, 2 + body] */
    int bits, bf16;  /* bf16: unused (PART's switch) */
    int to_blocks;   /* 1: q, d -> blocks; 0: blocks -> q, d */
} integer_blocks_t;

BODY void integer_blocks_body(const integer_blocks_t *t, Py_ssize_t lo, Py_ssize_t hi, const int unused) {
    (void)unused;
    const Py_ssize_t size = t->bits == 4 ? 2 + Q8_0_BLOCK / 2 : 2 + Q8_0_BLOCK;
    for (Py_ssize_t b = lo; b < hi; b++) {
        uint8_t *block = t->blocks + b * size;
        int8_t *q = t->q + b * Q8_0_BLOCK;
        if (t->to_blocks) {
            block[0] = (uint8_t)t->d[b];
            block[1] = (uint8_t)(t->d[b] >> 8);
            if (t->bits == 4)
                for (int j = 0; j < Q8_0_BLOCK / 2; j++)
                    block[2 + j] = (uint8_t)(((q[j] + 8) & 0x0F) | (((q[j + Q8_0_BLOCK / 2] + 8) & 0x0F) << 4));
            else
                memcpy(block + 2, q, Q8_0_BLOCK);
        } else {
            t->d[b] = (uint16_t)(block[0] | (block[1] << 8));
            if (t->bits == 4)
                for (int j = 0; j < Q8_0_BLOCK / 2; j++) {
                    q[j] = (int8_t)((block[2 + j] & 0x0F) - 8);
                    q[j + Q8_0_BLOCK / 2] = (int8_t)((block[2 + j] >> 4) - 8);
                }
            else
                memcpy(q, block + 2, Q8_0_BLOCK);
        }
    }
}

PART(integer_blocks, integer_blocks_t)

/* Both directions: q (int8 [blocks * 32]) and d (float16 bits [blocks]) are read for blocks and written from
   them; the Python wrappers hand the outputs in as new arrays. */
static PyObject *integer_blocks(Py_buffer *v, integer_blocks_t *t, int threads) {
    const Py_ssize_t blocks = v[1].len / 2, size = t->bits == 4 ? 2 + Q8_0_BLOCK / 2 : 2 + Q8_0_BLOCK;
    if (t->bits != 4 && t->bits != 8) {
        release(v, 3);
        PyErr_Format(PyExc_ValueError, "bits: %d, expected 4 or 8", t->bits);
        return NULL;
    }
    if (check_length(&v[0], blocks * Q8_0_BLOCK, "q") || check_length(&v[2], blocks * size, "blocks")) {
        release(v, 3);
        return NULL;
    }
    t->q = v[0].buf;
    t->d = v[1].buf;
    t->blocks = v[2].buf;
    Py_BEGIN_ALLOW_THREADS
    parallel_for(integer_blocks_part, t, blocks, thread_count(threads, blocks * Q8_0_BLOCK));
    Py_END_ALLOW_THREADS
    release(v, 3);
    Py_RETURN_NONE;
}

PyObject *py_q_blocks(PyObject *self, PyObject *args) {
    Py_buffer v[3];
    integer_blocks_t t = {0};
    int threads;
    if (!PyArg_ParseTuple(args, "y*y*iw*i", &v[0], &v[1], &t.bits, &v[2], &threads))
        return NULL;
    t.to_blocks = 1;
    return integer_blocks(v, &t, threads);
}

PyObject *py_q_integers(PyObject *self, PyObject *args) {
    Py_buffer v[3];
    integer_blocks_t t = {0};
    int threads;
    if (!PyArg_ParseTuple(args, "y*iw*w*i", &v[2], &t.bits, &v[0], &v[1], &threads))
        return NULL;
    return integer_blocks(v, &t, threads);
}
