/* Dense float checks: whether stored bits hold a NaN or an infinity (dtypes.all_finite), one pass that
vectorizes, where numpy takes three. */
#include "common.h"

typedef struct {
    const void *bits;
    uint32_t exponent; /* the exponent field's mask: all ones is infinity or NaN */
    int wide;          /* float32 words, else 2-byte ones (bfloat16, float16) */
    atomic_int found;
} nonfinite_t;

HOT static void nonfinite_part(const void *ctx, Py_ssize_t lo, Py_ssize_t hi) {
    nonfinite_t *q = (nonfinite_t *)ctx;
    const uint32_t exponent = q->exponent;
    uint32_t any = 0;
    if (q->wide) {
        const uint32_t *bits = q->bits;
        for (Py_ssize_t i = lo; i < hi; i++)
            any |= (bits[i] & exponent) == exponent;
    } else {
        const uint16_t *bits = q->bits;
        for (Py_ssize_t i = lo; i < hi; i++)
            any |= (bits[i] & exponent) == exponent;
    }
    if (any)
        atomic_store_explicit(&q->found, 1, memory_order_relaxed);
}

/* nonfinite(bits, kind, threads): kind 0 bfloat16 bits, 1 float16 bits, 2 float32 -> bool. */
PyObject *py_nonfinite(PyObject *self, PyObject *args) {
    Py_buffer view;
    int kind, threads;
    if (!PyArg_ParseTuple(args, "y*ii", &view, &kind, &threads))
        return NULL;
    static const uint32_t exponents[] = {0x7F80u, 0x7C00u, EXPONENT};
    if (kind < 0 || kind > 2 || view.len % (kind == 2 ? 4 : 2)) {
        PyErr_SetString(PyExc_ValueError, "kind must be 0 (bfloat16), 1 (float16) or 2 (float32), and the buffer whole values");
        PyBuffer_Release(&view);
        return NULL;
    }
    nonfinite_t q = {view.buf, exponents[kind], kind == 2, 0};
    const Py_ssize_t count = view.len / (kind == 2 ? 4 : 2);
    Py_BEGIN_ALLOW_THREADS
    parallel_for(nonfinite_part, &q, count, thread_count(threads, count / 4));
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyBool_FromLong(atomic_load(&q.found));
}
