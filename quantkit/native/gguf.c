/* GGUF: Q8_0 blocks, the bytes of quantkit/methods/gguf/legacy.py's reference. */
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

PyObject *py_q8_0(PyObject *self, PyObject *args) {
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
