/* GGUF: Q8_0, Q4_0, Q5_0 and the K-quants, the bytes of quantkit/methods/gguf/legacy.py's and kquants.py's
   references, and Q4_0 / Q8_0 codes moved to and from signed integers. */
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


static inline void put16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

/* ------------------------------------------------------------------------------------------------
   GGUF Q4_0 and Q5_0 (legacy._q4_0 / _q5_0): blocks of 32, d = the value of largest magnitude (numpy's
   argmax of |x|: the first one, a NaN before all) / -8 or -16, codes min(15 or 31, uint8(trunc(x / d + 8.5
   or 16.5))) with numpy's cast (the low byte of a 32-bit truncation, which is INT32_MIN for NaN and beyond
   its range). Stored as d (float16), for Q5_0 the fifth bits of the 32 codes (4 bytes, little endian),
   then code j | code j + 16 << 4. */

typedef struct {
    const void *src;
    int bf16;
    uint8_t *out;
    Py_ssize_t blocks; /* of 32 for Q4_0 / Q5_0, of 256 for the K-quants */
} gguf_t;

static inline uint8_t numpy_uint8(float v) { return (uint8_t)(fabsf(v) < 2147483648.0f ? (int32_t)v : INT32_MIN); }

BODY void q4_5_0_body(const gguf_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bf16, const int five) {
    const int size = five ? 22 : 18;
    const float divisor = five ? -16.0f : -8.0f, offset = five ? 16.5f : 8.5f;
    const uint8_t top = five ? 31 : 15;
    for (Py_ssize_t b = lo; b < hi; b++) {
        float x[32];
        int at = 0;
        for (int j = 0; j < 32; j++)
            x[j] = as_float(load_bits(q->src, bf16, b * 32 + j));
        for (int j = 1; j < 32 && x[at] == x[at]; j++)
            at = x[j] != x[j] || fabsf(x[j]) > fabsf(x[at]) ? j : at;
        const float d = x[at] / divisor, inverse = d == 0.0f ? 0.0f : 1.0f / d;
        uint8_t codes[32], *block = q->out + b * size, *qs = block + size - 16;
        for (int j = 0; j < 32; j++) {
            const uint8_t c = numpy_uint8(truncf(x[j] * inverse + offset));
            codes[j] = c < top ? c : top;
        }
        put16(block, float16_bits(d));
        if (five)
            for (int k = 0; k < 4; k++) {
                uint8_t byte = 0;
                for (int j = 0; j < 8; j++)
                    byte |= (uint8_t)(((codes[8 * k + j] >> 4) & 1) << j);
                block[2 + k] = byte;
            }
        for (int j = 0; j < 16; j++)
            qs[j] = (uint8_t)((codes[j] & 0x0F) | (codes[j + 16] << 4));
    }
}

BODY void q4_0_body(const gguf_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bf16) { q4_5_0_body(q, lo, hi, bf16, 0); }
BODY void q5_0_body(const gguf_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bf16) { q4_5_0_body(q, lo, hi, bf16, 1); }

/* ------------------------------------------------------------------------------------------------
   K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: the bytes of llama.cpp's quantize_row_q{2,3,4,5,6}_K_ref (kquants.py is
   the numpy spec). Their scale searches (make_qkx2_quants, make_qx_quants, make_q3_quants) sum 16 or 32 terms left to
   right, a chain of dependent float adds per sub-block; here the sub-blocks of a super-block run side by
   side in the lanes of 8-float vectors, each lane doing exactly the reference's operations in its order,
   and every `if` becomes a per-lane select. A lane's codes are recomputed at the end from the trial that
   won (the same operations give the same codes), so trials keep no codes. */

#define QK_K 256
#define LANES 8

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));

#define VALWAYS static inline __attribute__((always_inline))
/* Vectors are passed only between always-inlined functions: no call ever uses the ABI GCC warns about. */
#pragma GCC diagnostic ignored "-Wpsabi"

VALWAYS vf vf_set(float a) { return (vf){a, a, a, a, a, a, a, a}; }
VALWAYS vi vi_set(int32_t a) { return (vi){a, a, a, a, a, a, a, a}; }
/* where m (all ones or zeros per lane): a, else b */
VALWAYS vf vsel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
VALWAYS vi vseli(vi m, vi a, vi b) { return (m & a) | (~m & b); }
VALWAYS vf vabs(vf a) { return (vf)((vi)a & vi_set(0x7FFFFFFF)); }
VALWAYS vf vcvt(vi a) { return __builtin_convertvector(a, vf); }

/* ggml's nearest_int: the low 23 bits of v + 1.5 * 2**23, less 2**22 (round half to even inside +-2**22,
   the same bits outside, NaN included). */
static inline int32_t nearest_int(float v) { return (int32_t)(as_bits(v + 12582912.0f) & 0x7FFFFFu) - 0x400000; }
VALWAYS vi nearest_v(vf v) { return ((vi)(v + vf_set(12582912.0f)) & vi_set(0x7FFFFF)) - vi_set(0x400000); }
VALWAYS vi clamp_v(vi l, int32_t lo, int32_t hi) {
    l = vseli(l < vi_set(lo), vi_set(lo), l);
    return vseli(l > vi_set(hi), vi_set(hi), l);
}

/* The value of a float16 as the block stores it (GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))). */
static inline float f16_value(float v) { return float16_round(as_bits(v)); }


/* make_qkx2_quants(n, nmax, x, w, ..., rmin, 0.1, nstep, mad) for G * 8 sub-blocks at once: x and w hold
   element i of sub-block (g, lane) at [i * G + g][lane]. Out: scale and the_min per sub-block, and the codes
   at [i * G + g]. The G groups go through each loop together: independent chains, for the pipelines. */
#define MAXG 2
#define EACH(g) for (int g = 0; g < G; g++)
VALWAYS void qkx2_lanes(const int n, const int G, const vf *x, const vf *w, const float nmax, const float rmin,
                        const int nstep, const int mad, vf *scale_out, vf *min_out, vi *codes) {
    vf lo[MAXG], hi[MAXG], sum_w[MAXG], sum_x[MAXG], first_min[MAXG], iscale[MAXG], scale[MAXG], best_error[MAXG];
    vf best_iscale[MAXG], best_min[MAXG], laux[32 * MAXG];
    vi flat[MAXG];
    EACH(g) {
        lo[g] = hi[g] = x[g];
        sum_w[g] = w[g];
        sum_x[g] = w[g] * x[g];
    }
    for (int i = 1; i < n; i++)
        EACH(g) {
            const vf xi = x[i * G + g], wi = w[i * G + g];
            lo[g] = vsel(xi < lo[g], xi, lo[g]);
            hi[g] = vsel(xi > hi[g], xi, hi[g]);
            sum_w[g] += wi;
            sum_x[g] += wi * xi;
        }
    EACH(g) {
        lo[g] = vsel(lo[g] > vf_set(0.0f), vf_set(0.0f), lo[g]);
        flat[g] = hi[g] == lo[g];
        first_min[g] = best_min[g] = lo[g];
        iscale[g] = best_iscale[g] = vf_set(nmax) / (hi[g] - lo[g]);
        scale[g] = vf_set(1.0f) / iscale[g];
        best_error[g] = vf_set(0.0f);
    }
    for (int i = 0; i < n; i++)
        EACH(g) {
            const vf xi = x[i * G + g];
            const vf l = vcvt(clamp_v(nearest_v(iscale[g] * (xi - lo[g])), 0, (int32_t)nmax));
            vf diff = scale[g] * l + lo[g] - xi;
            diff = mad ? vabs(diff) : diff * diff;
            best_error[g] += w[i * G + g] * diff;
        }
    for (int is = 0; is <= nstep; is++) {
        vf sum_l[MAXG], sum_l2[MAXG], sum_xl[MAXG], this_scale[MAXG], this_min[MAXG], error[MAXG];
        EACH(g) {
            iscale[g] = (vf_set(rmin + 0.1f * (float)is) + vf_set(nmax)) / (hi[g] - lo[g]);
            sum_l[g] = sum_l2[g] = sum_xl[g] = error[g] = vf_set(0.0f);
        }
        for (int i = 0; i < n; i++)
            EACH(g) {
                const vf xi = x[i * G + g];
                const vf l = vcvt(clamp_v(nearest_v(iscale[g] * (xi - lo[g])), 0, (int32_t)nmax));
                laux[i * G + g] = l;
                const vf wl = w[i * G + g] * l;
                sum_l[g] += wl;
                sum_l2[g] += wl * l;
                sum_xl[g] += wl * xi;
            }
        vi positive[MAXG];
        vf det[MAXG];
        EACH(g) {
            det[g] = sum_w[g] * sum_l2[g] - sum_l[g] * sum_l[g];
            this_scale[g] = (sum_w[g] * sum_xl[g] - sum_x[g] * sum_l[g]) / det[g];
            this_min[g] = (sum_l2[g] * sum_x[g] - sum_l[g] * sum_xl[g]) / det[g];
            positive[g] = this_min[g] > vf_set(0.0f);
            this_min[g] = vsel(positive[g], vf_set(0.0f), this_min[g]);
            this_scale[g] = vsel(positive[g], sum_xl[g] / sum_l2[g], this_scale[g]);
        }
        for (int i = 0; i < n; i++)
            EACH(g) {
                vf diff = this_scale[g] * laux[i * G + g] + this_min[g] - x[i * G + g];
                diff = mad ? vabs(diff) : diff * diff;
                error[g] += w[i * G + g] * diff;
            }
        EACH(g) {
            const vi win = (det[g] > vf_set(0.0f)) & (error[g] < best_error[g]);
            best_error[g] = vsel(win, error[g], best_error[g]);
            scale[g] = vsel(win, this_scale[g], scale[g]);
            best_iscale[g] = vsel(win, iscale[g], best_iscale[g]);
            best_min[g] = vsel(win, lo[g], best_min[g]);
            lo[g] = vsel(win, this_min[g], lo[g]);
        }
    }
    EACH(g) {
        scale_out[g] = vsel(flat[g], vf_set(0.0f), scale[g]);
        min_out[g] = -vsel(flat[g], first_min[g], lo[g]);
    }
    for (int i = 0; i < n; i++)
        EACH(g) {
            const vi l = clamp_v(nearest_v(best_iscale[g] * (x[i * G + g] - best_min[g])), 0, (int32_t)nmax);
            codes[i * G + g] = vseli(flat[g], vi_set(0), l);
        }
}

/* The prelude make_qx_quants and make_q3_quants share, for G * 8 sub-blocks: per sub-block the largest |x|
   (amax) and the value holding it (top, the first on ties), and the weights x^2 and x^3. */
VALWAYS void peak_and_weights(const int n, const int G, const vf *x, vf *amax, vf *top, vf *w, vf *wx) {
    EACH(g) amax[g] = top[g] = vf_set(0.0f);
    for (int i = 0; i < n; i++)
        EACH(g) {
            const vf xi = x[i * G + g], ax = vabs(xi);
            const vi more = ax > amax[g];
            amax[g] = vsel(more, ax, amax[g]);
            top[g] = vsel(more, xi, top[g]);
            w[i * G + g] = xi * xi;
            wx[i * G + g] = w[i * G + g] * xi;
        }
}

/* make_qx_quants(n, nmax, x, L, 1, NULL) (weights x^2) for G * 8 sub-blocks, laid out as in qkx2_lanes;
   codes are + nmax. Its trials depend on none before them but for which one wins. */
VALWAYS void qx_lanes(const int n, const int G, const vf *x, const int nmax, vf *scale_out, vi *codes) {
    vf amax[MAXG], top[MAXG], w[16 * MAXG], wx[16 * MAXG], scale[MAXG], best[MAXG], best_iscale[MAXG];
    EACH(g) scale[g] = best[g] = best_iscale[g] = vf_set(0.0f);
    peak_and_weights(n, G, x, amax, top, w, wx);
    for (int k = 0; k < 19; k++) {
        /* the first fit at -nmax / max, then the trials is = -9 .. -1, 1 .. 9 */
        const int is = k == 0 ? 0 : k <= 9 ? k - 10 : k - 9;
        vf iscale[MAXG], sumlx[MAXG], suml2[MAXG];
        EACH(g) {
            iscale[g] = is == 0 ? vf_set((float)-nmax) / top[g] : -(vf_set((float)nmax) + vf_set(0.1f * (float)is)) / top[g];
            sumlx[g] = suml2[g] = vf_set(0.0f);
        }
        for (int i = 0; i < n; i++)
            EACH(g) {
                const vf l = vcvt(clamp_v(nearest_v(iscale[g] * x[i * G + g]), -nmax, nmax - 1));
                sumlx[g] += wx[i * G + g] * l;
                suml2[g] += w[i * G + g] * l * l;
            }
        EACH(g) {
            if (is == 0) {
                scale[g] = vsel(suml2[g] != vf_set(0.0f), sumlx[g] / suml2[g], vf_set(0.0f));
                best[g] = scale[g] * sumlx[g];
                best_iscale[g] = iscale[g];
                continue;
            }
            const vi win = (suml2[g] > vf_set(0.0f)) & (sumlx[g] * sumlx[g] > best[g] * suml2[g]);
            scale[g] = vsel(win, sumlx[g] / suml2[g], scale[g]);
            best[g] = vsel(win, scale[g] * sumlx[g], best[g]);
            best_iscale[g] = vsel(win, iscale[g], best_iscale[g]);
        }
    }
    vi empty[MAXG];
    EACH(g) {
        empty[g] = amax[g] < vf_set(1e-15f);
        scale_out[g] = vsel(empty[g], vf_set(0.0f), scale[g]);
    }
    for (int i = 0; i < n; i++)
        EACH(g) {
            const vi l = clamp_v(nearest_v(best_iscale[g] * x[i * G + g]), -nmax, nmax - 1) + vi_set(nmax);
            codes[i * G + g] = vseli(empty[g], vi_set(0), l);
        }
}


/* make_q3_quants(n, nmax, x, L, true) for G * 8 sub-blocks (laid out as in qkx2_lanes): a first fit at
   -nmax / max, then up to 5 passes that move one code at a time where that raises (sum w x l)^2 / sum w l^2.
   The lanes make their passes together until one changes no lane: a pass that changes nothing in a lane
   leaves it as it found it, so the passes the reference skips after one would change nothing either.
   Codes + nmax; an empty sub-block's are 0. */
VALWAYS void q3_lanes(const int n, const int G, const vf *x, const int nmax, vf *scale_out, vi *codes) {
    vf amax[MAXG], top[MAXG], w[16 * MAXG], wx[16 * MAXG], sumlx[MAXG], suml2[MAXG], iscale[MAXG], L[16 * MAXG];
    EACH(g) sumlx[g] = suml2[g] = vf_set(0.0f);
    peak_and_weights(n, G, x, amax, top, w, wx);
    EACH(g) iscale[g] = vf_set((float)-nmax) / top[g];
    for (int i = 0; i < n; i++)
        EACH(g) {
            const vf l = vcvt(clamp_v(nearest_v(iscale[g] * x[i * G + g]), -nmax, nmax - 1));
            L[i * G + g] = l;
            sumlx[g] += wx[i * G + g] * l;
            suml2[g] += w[i * G + g] * l * l;
        }
    for (int pass = 0; pass < 5; pass++) {
        vi changed = vi_set(0);
        for (int i = 0; i < n; i++)
            EACH(g) {
                const int k = i * G + g;
                vf slx = sumlx[g] - wx[k] * L[k];
                vf sl2 = suml2[g] - w[k] * L[k] * L[k];
                const vi positive = slx > vf_set(0.0f);
                const vf l = vcvt(clamp_v(nearest_v(x[k] * sl2 / slx), -nmax, nmax - 1));
                slx += wx[k] * l;
                sl2 += w[k] * l * l;
                const vi better = positive & (l != L[k]) & (sl2 > vf_set(0.0f)) &
                                  (slx * slx * suml2[g] > sumlx[g] * sumlx[g] * sl2);
                L[k] = vsel(better, l, L[k]);
                sumlx[g] = vsel(better, slx, sumlx[g]);
                suml2[g] = vsel(better, sl2, suml2[g]);
                changed |= better;
            }
        int any = 0;
        for (int k = 0; k < LANES; k++)
            any |= changed[k];
        if (!any)
            break;
    }
    EACH(g) {
        const vi empty = amax[g] < vf_set(1e-15f);
        scale_out[g] = vsel(empty | (suml2[g] <= vf_set(0.0f)), vf_set(0.0f), sumlx[g] / suml2[g]);
        for (int i = 0; i < n; i++)
            codes[i * G + g] = vseli(empty, vi_set(0), __builtin_convertvector(L[i * G + g], vi) + vi_set(nmax));
    }
}

/* Super-blocks first .. first + count - 1 (the last repeated to fill G * 8 sub-blocks of n) into lanes:
   xs the values in order, x[i * G + g][lane] element i of sub-block 8 g + lane. */
VALWAYS void load_lanes(const gguf_t *q, const int bf16, Py_ssize_t first, int count, const int n, const int G,
                        float *xs, vf *x) {
    const int per = QK_K / n; /* sub-blocks per super-block */
    for (int s = 0; s < G * LANES; s++) {
        const Py_ssize_t b = first + min_size(s / per, count - 1);
        for (int i = 0; i < n; i++) {
            xs[s * n + i] = as_float(load_bits(q->src, bf16, b * QK_K + (s % per) * n + i));
            x[i * G + s / LANES][s % LANES] = xs[s * n + i];
        }
    }
}

/* The 8 sub-block scales and mins of a Q4_K / Q5_K super-block quantized to 6 bits against their maxima:
   the 12 scale bytes, float16 d and dmin, and the codes of each sub-block requantized with its stored
   scale and min (a sub-block whose scale is 0 keeps its codes). */
static void scale_min_finish(const float *x, const float *scales, const float *mins, const int nmax, uint8_t *head,
                             int32_t *codes) {
    float max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < 8; j++) {
        max_scale = scales[j] > max_scale ? scales[j] : max_scale;
        max_min = mins[j] > max_min ? mins[j] : max_min;
    }
    const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
    const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
    uint8_t *sc = head + 4, ls[8], lm[8];
    memset(sc, 0, 12);
    for (int j = 0; j < 8; j++) {
        ls[j] = (uint8_t)nearest_int(inv_scale * scales[j]);
        lm[j] = (uint8_t)nearest_int(inv_min * mins[j]);
        ls[j] = ls[j] < 63 ? ls[j] : 63;
        lm[j] = lm[j] < 63 ? lm[j] : 63;
        if (j < 4) {
            sc[j] = ls[j];
            sc[j + 4] = lm[j];
        } else {
            sc[j + 4] = (uint8_t)((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
            sc[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
            sc[j] |= (uint8_t)((lm[j] >> 4) << 6);
        }
    }
    put16(head, float16_bits(max_scale / 63.0f));
    put16(head + 2, float16_bits(max_min / 63.0f));
    const float d_all = f16_value(max_scale / 63.0f), dmin_all = f16_value(max_min / 63.0f);
    for (int j = 0; j < 8; j++) {
        const float d = d_all * ls[j];
        if (d == 0.0f)
            continue;
        const float dm = dmin_all * lm[j];
        for (int i = 0; i < 32; i++) {
            const int32_t l = nearest_int((x[32 * j + i] + dm) / d);
            codes[32 * j + i] = l < 0 ? 0 : l > nmax ? nmax : l;
        }
    }
}

/* A super-block's 16 sub-blocks of 16 out of the lanes (G = 2): scales[s] and codes L[16 s + i]. */
VALWAYS void from_lanes16(const vf *scale, const vi *lanes, float *scales, int32_t *L) {
    for (int s = 0; s < 16; s++) {
        scales[s] = scale[s / LANES][s % LANES];
        for (int i = 0; i < 16; i++)
            L[16 * s + i] = lanes[i * 2 + s / LANES][s % LANES];
    }
}

/* The value of largest magnitude among 16, the first one on ties (C's strict >); its magnitude to *amax. */
static inline float signed_max16(const float *v, float *amax) {
    float top = 0.0f;
    *amax = 0.0f;
    for (int s = 0; s < 16; s++)
        if (fabsf(v[s]) > *amax) {
            *amax = fabsf(v[s]);
            top = v[s];
        }
    return top;
}

/* 2-bit codes: byte i of each 32 holds codes i, i + 32, i + 64, i + 96 of its half of 128, low bits first. */
static inline void pack_2bit(const int32_t *L, uint8_t *qs) {
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < 32; i++) {
            const int32_t *c = L + 128 * h + i;
            qs[32 * h + i] = (uint8_t)(c[0] | (c[32] << 2) | (c[64] << 4) | (c[96] << 6));
        }
}

/* Q4_K (nmax 15) and Q5_K (31): super-blocks in pairs, 16 sub-blocks of 32. */
BODY void q45_k_body(const gguf_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bf16, const int five) {
    const int nmax = five ? 31 : 15, size = five ? 176 : 144;
    float xs[2 * QK_K];
    vf x[64], w[64], scale[2], min[2];
    vi lanes[64];
    for (Py_ssize_t u = lo; u < hi; u++) {
        const int count = (int)min_size(2, q->blocks - 2 * u);
        load_lanes(q, bf16, 2 * u, count, 32, 2, xs, x);
        for (int g = 0; g < 2; g++) {
            vf sum_x2 = vf_set(0.0f);
            for (int i = 0; i < 32; i++)
                sum_x2 += x[i * 2 + g] * x[i * 2 + g];
            vf av_x;
            for (int k = 0; k < LANES; k++)
                av_x[k] = sqrtf(sum_x2[k] / 32);
            for (int i = 0; i < 32; i++)
                w[i * 2 + g] = av_x + vabs(x[i * 2 + g]);
        }
        qkx2_lanes(32, 2, x, w, (float)nmax, five ? -0.5f : -1.0f, five ? 15 : 20, 0, scale, min, lanes);
        for (int g = 0; g < count; g++) {
            int32_t L[QK_K];
            float scales[8], mins[8];
            for (int j = 0; j < 8; j++) {
                scales[j] = scale[g][j];
                mins[j] = min[g][j];
                for (int i = 0; i < 32; i++)
                    L[32 * j + i] = lanes[i * 2 + g][j];
            }
            uint8_t *block = q->out + (2 * u + g) * size;
            scale_min_finish(xs + g * QK_K, scales, mins, nmax, block, L);
            uint8_t *qs = block + (five ? 48 : 16);
            if (five)
                memset(block + 16, 0, 32);
            for (int h = 0; h < 4; h++)
                for (int i = 0; i < 32; i++) {
                    const int32_t first = L[64 * h + i], second = L[64 * h + 32 + i];
                    qs[32 * h + i] = (uint8_t)((first & 0xF) | ((second & 0xF) << 4));
                    if (five)
                        block[16 + i] |= (uint8_t)(((first >> 4) << (2 * h)) | ((second >> 4) << (2 * h + 1)));
                }
        }
    }
}

BODY void q4_k_body(const gguf_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bf16) { q45_k_body(q, lo, hi, bf16, 0); }
BODY void q5_k_body(const gguf_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bf16) { q45_k_body(q, lo, hi, bf16, 1); }

/* Q6_K: one super-block a unit, 16 sub-blocks of 16. */
BODY void q6_k_body(const gguf_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bf16) {
    float xs[QK_K];
    vf x[32], scale[2];
    vi lanes[32];
    for (Py_ssize_t b = lo; b < hi; b++) {
        load_lanes(q, bf16, b, 1, 16, 2, xs, x);
        qx_lanes(16, 2, x, 32, scale, lanes);
        uint8_t *block = q->out + b * 210;
        float scales[16], max_abs;
        int32_t L[QK_K];
        from_lanes16(scale, lanes, scales, L);
        const float max_scale = signed_max16(scales, &max_abs);
        if (max_abs < 1e-15f) {
            memset(block, 0, 210);
            continue;
        }
        const float iscale = -128.0f / max_scale, d_all = f16_value(1 / iscale);
        put16(block + 208, float16_bits(1 / iscale));
        for (int s = 0; s < 16; s++) {
            const int32_t l = nearest_int(iscale * scales[s]);
            block[192 + s] = (uint8_t)(int8_t)(l < 127 ? l : 127);
        }
        for (int s = 0; s < 16; s++) {
            const float d = d_all * (float)(int8_t)block[192 + s];
            if (d == 0.0f)
                continue;
            for (int i = 0; i < 16; i++) {
                const int32_t l = nearest_int(xs[16 * s + i] / d);
                L[16 * s + i] = (l < -32 ? -32 : l > 31 ? 31 : l) + 32;
            }
        }
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 32; i++) {
                const int32_t *c = L + 128 * h + i;
                block[64 * h + i] = (uint8_t)((c[0] & 0xF) | ((c[64] & 0xF) << 4));
                block[64 * h + 32 + i] = (uint8_t)((c[32] & 0xF) | ((c[96] & 0xF) << 4));
                block[128 + 32 * h + i] = (uint8_t)((c[0] >> 4) | ((c[32] >> 4) << 2) | ((c[64] >> 4) << 4) | ((c[96] >> 4) << 6));
            }
    }
}

/* Q2_K: one super-block a unit, 16 sub-blocks of 16, weights |x|, mean absolute error. */
BODY void q2_k_body(const gguf_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bf16) {
    float xs[QK_K];
    vf x[32], w[32], scale[2], min[2];
    vi lanes[32];
    for (Py_ssize_t b = lo; b < hi; b++) {
        load_lanes(q, bf16, b, 1, 16, 2, xs, x);
        for (int k = 0; k < 32; k++)
            w[k] = vabs(x[k]);
        qkx2_lanes(16, 2, x, w, 3.0f, -0.5f, 15, 1, scale, min, lanes);
        uint8_t *block = q->out + b * 84, *sc = block;
        float scales[16], mins[16], max_scale = 0.0f, max_min = 0.0f;
        int32_t L[QK_K];
        from_lanes16(scale, lanes, scales, L);
        for (int s = 0; s < 16; s++) {
            mins[s] = min[s / LANES][s % LANES];
            max_scale = scales[s] > max_scale ? scales[s] : max_scale;
            max_min = mins[s] > max_min ? mins[s] : max_min;
        }
        memset(sc, 0, 16);
        if (max_scale > 0) {
            const float iscale = 15.0f / max_scale;
            for (int s = 0; s < 16; s++)
                sc[s] = (uint8_t)nearest_int(iscale * scales[s]);
        }
        if (max_min > 0) {
            const float iscale = 15.0f / max_min;
            for (int s = 0; s < 16; s++)
                sc[s] |= (uint8_t)((uint32_t)nearest_int(iscale * mins[s]) << 4);
        }
        const float d_scale = max_scale > 0 ? max_scale / 15.0f : 0.0f, d_min = max_min > 0 ? max_min / 15.0f : 0.0f;
        put16(block + 80, float16_bits(d_scale));
        put16(block + 82, float16_bits(d_min));
        for (int s = 0; s < 16; s++) {
            const float d = f16_value(d_scale) * (sc[s] & 0xF);
            if (d == 0.0f)
                continue;
            const float dm = f16_value(d_min) * (sc[s] >> 4);
            for (int i = 0; i < 16; i++) {
                const int32_t l = nearest_int((xs[16 * s + i] + dm) / d);
                L[16 * s + i] = l < 0 ? 0 : l > 3 ? 3 : l;
            }
        }
        pack_2bit(L, block + 16);
    }
}

/* Q3_K: one super-block a unit, 16 sub-blocks of 16; 6-bit signed sub-block scales. */
BODY void q3_k_body(const gguf_t *q, Py_ssize_t lo, Py_ssize_t hi, const int bf16) {
    float xs[QK_K];
    vf x[32], scale[2];
    vi lanes[32];
    for (Py_ssize_t b = lo; b < hi; b++) {
        load_lanes(q, bf16, b, 1, 16, 2, xs, x);
        q3_lanes(16, 2, x, 4, scale, lanes);
        uint8_t *block = q->out + b * 110, *hmask = block, *qs = block + 32, *sc = block + 96;
        float scales[16], amax;
        int32_t L[QK_K];
        from_lanes16(scale, lanes, scales, L);
        const float max_scale = signed_max16(scales, &amax);
        memset(sc, 0, 12);
        float d_all = 0.0f;
        if (max_scale != 0.0f) {
            const float iscale = -32.0f / max_scale;
            for (int s = 0; s < 16; s++) {
                int32_t l = (int8_t)nearest_int(iscale * scales[s]);
                l = (l < -32 ? -32 : l > 31 ? 31 : l) + 32;
                if (s < 8)
                    sc[s] = (uint8_t)(l & 0xF);
                else
                    sc[s - 8] |= (uint8_t)((l & 0xF) << 4);
                sc[s % 4 + 8] |= (uint8_t)((l >> 4) << (2 * (s / 4)));
            }
            put16(block + 108, float16_bits(1 / iscale));
            d_all = f16_value(1 / iscale);
        } else {
            put16(block + 108, 0);
        }
        for (int s = 0; s < 16; s++) {
            const int32_t low = s < 8 ? sc[s] & 0xF : sc[s - 8] >> 4;
            const float d = d_all * (float)((low | (((sc[8 + s % 4] >> (2 * (s / 4))) & 3) << 4)) - 32);
            if (d == 0.0f)
                continue;
            for (int i = 0; i < 16; i++) {
                const int32_t l = nearest_int(xs[16 * s + i] / d);
                L[16 * s + i] = (l < -4 ? -4 : l > 3 ? 3 : l) + 4;
            }
        }
        memset(hmask, 0, 32);
        for (int j = 0; j < QK_K; j++)
            if (L[j] > 3) {
                hmask[j % 32] |= (uint8_t)(1u << (j / 32));
                L[j] -= 4;
            }
        pack_2bit(L, qs);
    }
}

PART(q4_0, gguf_t)
PART(q5_0, gguf_t)
PART(q2_k, gguf_t)
PART(q3_k, gguf_t)
PART(q4_k, gguf_t)
PART(q5_k, gguf_t)
PART(q6_k, gguf_t)

/* Per ggml type: values and bytes a block, blocks a unit of work, and the work per value against Q8_0's
   (the scale searches of the K-quants: ~16x), which decides when threads pay. */
static const struct {
    int type, values, size, per_unit, work;
    part_fn part;
} GGUF_KERNELS[] = {
    {2, 32, 18, 1, 1, q4_0_part},    {6, 32, 22, 1, 1, q5_0_part},   {10, QK_K, 84, 1, 16, q2_k_part}, {11, QK_K, 110, 1, 16, q3_k_part},
    {12, QK_K, 144, 2, 16, q4_k_part}, {13, QK_K, 176, 2, 16, q5_k_part}, {14, QK_K, 210, 1, 16, q6_k_part},
};

/* gguf_blocks(src, bf16, ggml type, blocks, threads): Q4_0 (2), Q5_0 (6), Q2_K (10), Q3_K (11), Q4_K (12), Q5_K (13),
   Q6_K (14). Q4_K and Q5_K take super-blocks in pairs (the sub-blocks of both in the lanes); the last pair
   may be one. */
PyObject *py_gguf_blocks(PyObject *self, PyObject *args) {
    Py_buffer v[2];
    gguf_t q;
    int type, threads, k = 0;
    if (!PyArg_ParseTuple(args, "y*piw*i", &v[0], &q.bf16, &type, &v[1], &threads))
        return NULL;
    while (k < (int)(sizeof GGUF_KERNELS / sizeof GGUF_KERNELS[0]) && GGUF_KERNELS[k].type != type)
        k++;
    if (k == (int)(sizeof GGUF_KERNELS / sizeof GGUF_KERNELS[0])) {
        release(v, 2);
        PyErr_Format(PyExc_ValueError, "gguf_blocks: no kernel for ggml type %d", type);
        return NULL;
    }
    const Py_ssize_t values = GGUF_KERNELS[k].values, item = q.bf16 ? 2 : 4;
    q.blocks = v[0].len / (item * values);
    q.src = v[0].buf;
    q.out = v[1].buf;
    if (check_length(&v[0], q.blocks * item * values, "input (whole blocks)") ||
        check_length(&v[1], q.blocks * GGUF_KERNELS[k].size, "blocks")) {
        release(v, 2);
        return NULL;
    }
    const Py_ssize_t per = GGUF_KERNELS[k].per_unit, units = (q.blocks + per - 1) / per;
    Py_BEGIN_ALLOW_THREADS
    parallel_for(GGUF_KERNELS[k].part, &q, units, thread_count(threads, q.blocks * values * GGUF_KERNELS[k].work));
    Py_END_ALLOW_THREADS
    release(v, 2);
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
