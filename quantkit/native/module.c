/* quantkit.native._kernels: one extension holding every family's kernels (bnb.c, ct.c, dense.c, gguf.c, gptq.c) and the
   SIGBUS guard of source maps (mapguard.c). */
#include "common.h"

int quantkit_simd = 1;

static PyObject *py_simd(PyObject *self, PyObject *args) {
    int flag, before = quantkit_simd;
    if (!PyArg_ParseTuple(args, "p", &flag))
        return NULL;
    quantkit_simd = flag;
    return PyBool_FromLong(before);
}

static PyMethodDef methods[] = {
    {"simd", py_simd, METH_VARARGS, "simd(flag) -> the previous setting: whether hand-written AVX2 paths may run (tests)"},
    {"quantize_4bit", py_quantize_4bit, METH_VARARGS,
     "quantize_4bit(src, bf16, blocksize, bounds, order, packed, absmax, threads): NF4/FP4 codes and absmax"},
    {"quantize_int8", py_quantize_int8, METH_VARARGS,
     "quantize_int8(src, bf16, cols, codes, scb, threads): LLM.int8 codes and SCB, row by row"},
    {"dequantize_4bit", py_dequantize_4bit, METH_VARARGS,
     "dequantize_4bit(packed, absmax, table, blocksize, first, bf16, out, threads): elements first.. into out"},
    {"ct_fp8_channel", py_ct_fp8_channel, METH_VARARGS,
     "ct_fp8_channel(src, dtype, cols, codes, scale, threads): compressed-tensors FP8 codes and per-row scales"},
    {"ct_int_symmetric", py_ct_int_symmetric, METH_VARARGS,
     "ct_int_symmetric(src, dtype, cols, group, bits, packed, scale, threads) -> all finite: compressed-tensors W4A16 / W8A16 "
     "codes packed into int32 along rows, and the group scales"},
    {"fp8_dense", py_fp8_dense, METH_VARARGS,
     "fp8_dense(codes, cols, scales, block_rows, block_cols, first_row, round, out, dense, threads): e4m3 codes times "
     "block scales, rounded to `round` then stored as `out` (0 bfloat16, 1 float16, 2 float32)"},
    {"fp8_blocks", py_fp8_blocks, METH_VARARGS,
     "fp8_blocks(src, bf16, cols, block_rows, block_cols, codes, scale_inv, threads) -> all finite: fine-grained FP8 codes "
     "and scale_inv per block, as transformers' Fp8Quantize"},
    {"ct_fp8_block", py_ct_fp8_block, METH_VARARGS,
     "ct_fp8_block(src, dtype, cols, block_rows, block_cols, codes, scale, threads) -> all finite: compressed-tensors "
     "FP8_BLOCK codes and per-block scales"},
    {"mxfp4_dense", py_mxfp4_dense, METH_VARARGS,
     "mxfp4_dense(blocks, scales, groups, first_group, out, dense, threads): one gpt-oss expert's MXFP4 groups, dense and "
     "transposed"},
    {"nonfinite", py_nonfinite, METH_VARARGS, "nonfinite(bits, wide, threads) -> whether any 2-byte (bf16/f16, wide 0) or float32 (wide 1) value is NaN or infinite"},
    {"q8_0", py_q8_0, METH_VARARGS, "q8_0(src, bf16, blocks, threads): GGUF Q8_0 blocks of 34 bytes"},
    {"gguf_blocks", py_gguf_blocks, METH_VARARGS,
     "gguf_blocks(src, bf16, ggml_type, blocks, threads): GGUF Q4_0 / Q5_0 blocks, Q2_K / Q3_K / Q4_K / Q5_K / Q6_K super-blocks"},
    {"q_blocks", py_q_blocks, METH_VARARGS,
     "q_blocks(q, d, bits, blocks, threads): GGUF Q4_0 (bits 4) / Q8_0 (bits 8) blocks of int8 codes and float16 factors"},
    {"q_integers", py_q_integers, METH_VARARGS, "q_integers(blocks, bits, q, d, threads): the inverse of q_blocks"},
    {"gptq_unpack_signed", py_gptq_unpack_signed, METH_VARARGS,
     "gptq_unpack_signed(qweight, turned, bits, group, in, out, q, threads): GPTQ codes as signed integers [out, in]"},
    {"gptq_pack_signed", py_gptq_pack_signed, METH_VARARGS,
     "gptq_pack_signed(q, turned, bits, group, in, out, qweight, threads): the inverse of gptq_unpack_signed"},
    {"gptq_dense", py_gptq_dense, METH_VARARGS,
     "gptq_dense(qweight, qzeros, scales, g_idx, bits, awq, offset, in, out, groups, first_row, dtype, dense, threads): GPTQ "
     "(or AWQ GEMM) output rows first_row.. as dense dtype (0 bfloat16, 1 float16, 2 float32) values"},
    {"gptq_rtn", py_gptq_rtn, METH_VARARGS,
     "gptq_rtn(src, bf16, rows, cols, group_size, bits, sym, min_zero, out_features, col0, qweight, scales, zeros, "
     "problems, threads): round-to-nearest codes packed into qweight columns col0.., scales and zero points"},
    {"guard_map", py_guard_map, METH_VARARGS,
     "guard_map(start, length, owner): a SIGBUS in [start, start + length) reads zeros and is counted; returns a slot (-1: none free)"},
    {"unguard_map", py_unguard_map, METH_VARARGS, "unguard_map(slot): the map is gone"},
    {"map_faults", py_map_faults, METH_NOARGS, "map_faults() -> (faults so far, owner of the last one)"},
    {"ct_int_dense", py_ct_int_dense, METH_VARARGS,
     "ct_int_dense(codes, bits, e2m1, cols, scales, zeros, block_rows, block_cols, first_row, round, out, dense, threads): "
     "compressed-tensors pack-quantized (bits 4, 8), int-quantized (bits 0) or fp4 (e2m1) codes back to dense"},
    {"ct_int_asymmetric", py_ct_int_asymmetric, METH_VARARGS,
     "ct_int_asymmetric(src, dtype, cols, group, bits, packed, scale, zero, threads) -> all finite: compressed-tensors "
     "W4A16_ASYM codes packed into int32 along rows, the group scales and the signed zero points"},
    {"ct_fp4", py_ct_fp4, METH_VARARGS,
     "ct_fp4(src, dtype, cols, mx, global_scale, packed, scale, threads) -> all finite: compressed-tensors NVFP4A16 (mx 0) "
     "or MXFP4A16 (mx 1) e2m1 codes two a byte, and the group scale codes"},
    {"ct_peak", py_ct_peak, METH_VARARGS, "ct_peak(src, bf16, threads) -> max |value| (NaN if any value is NaN)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "quantkit's compiled kernels", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
