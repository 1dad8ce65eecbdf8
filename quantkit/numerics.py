"""Numerics the methods share: chunk sizes, error figures, and torch's CPU float32 sum and mean
reproduced bit for bit in numpy.

bitsandbytes' double quantization subtracts `absmax.mean()` as torch computes it, so matching its bytes
means matching torch's summation order: a cascade of four levels of accumulators over vectors of
8 (AVX2) or 16 (AVX-512) lanes, four vectors at a time, split across threads above 32768 elements.
(The float16 rounding the numba kernels share is in jit.py, beside numba.)
"""

from __future__ import annotations

import math
import os

import numpy as np

CHUNK_ELEMENTS = 1 << 22  # values quantized or dequantized per step: memory follows a chunk, not a tensor
COPY_CHUNK = 16 << 20  # bytes read and written per step when a tensor is copied or converted


def error_figures(norm: float, diff: float) -> tuple[float, float]:
    """(relative error, SNR in dB) from ||reference|| and ||reference - approximation||."""
    rel = diff / norm if norm else float(diff > 0)
    snr = 20 * math.log10(norm / diff) if diff and norm else math.inf
    return rel, snr


class ErrorSums:
    """||reference||^2 and ||reference - approximation||^2 gathered chunk by chunk, for error figures of a
    tensor that is never whole in memory."""

    def __init__(self) -> None:
        self.reference = 0.0
        self.difference = 0.0

    def add(self, reference: np.ndarray, approx: np.ndarray) -> None:
        ref = np.ascontiguousarray(reference, dtype=np.float32).reshape(-1)
        diff = ref - np.asarray(approx, dtype=np.float32).reshape(-1)
        self.reference += float(np.dot(ref, ref))
        self.difference += float(np.dot(diff, diff))

    def figures(self) -> tuple[float, float]:
        """(relative error, SNR in dB)."""
        return error_figures(math.sqrt(self.reference), math.sqrt(self.difference))


def relative_error(reference: np.ndarray, approx: np.ndarray) -> tuple[float, float]:
    ref = reference.astype(np.float64).reshape(-1)
    return error_figures(float(np.linalg.norm(ref)), float(np.linalg.norm(ref - approx.astype(np.float64).reshape(-1))))

_GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE
_ILP = 4  # accumulators per row_sum
_LEVELS = 4


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


def _multi_row_sum(rows: np.ndarray) -> np.ndarray:
    """Cascade sum over axis 0 of `rows` ([size, ...] float32), in the order of torch's multi_row_sum."""
    size = rows.shape[0]
    level_power = max(4, _ceil_log2(size) // _LEVELS)
    step = 1 << level_power
    mask = step - 1
    acc = np.zeros((_LEVELS,) + rows.shape[1:], dtype=np.float32)
    n_steps = size // step
    if n_steps:
        # Each step adds `step` rows one after another into a zeroed level-0 accumulator.
        groups = rows[: n_steps * step].reshape((n_steps, step) + rows.shape[1:])
        step_sums = groups[:, 0].copy()
        for k in range(1, step):
            step_sums += groups[:, k]
        for s in range(n_steps):
            i = (s + 1) * step
            acc[1] += step_sums[s]
            for j in range(2, _LEVELS):
                if i & (mask << ((j - 1) * level_power)):
                    break
                acc[j] += acc[j - 1]
                acc[j - 1] = 0
    for i in range(n_steps * step, size):
        acc[0] += rows[i]
    for j in range(1, _LEVELS):
        acc[0] += acc[j]
    return acc[0]


def _row_sum(elems: np.ndarray) -> np.ndarray:
    """torch's row_sum: four interleaved cascades, then the leftovers, then the four partials."""
    size = elems.shape[0]
    size_ilp = size // _ILP
    rows = elems[: size_ilp * _ILP].reshape((size_ilp, _ILP) + elems.shape[1:])
    if size_ilp:
        partial = _multi_row_sum(rows)
    else:
        partial = np.zeros((_ILP,) + elems.shape[1:], dtype=np.float32)
    for i in range(size_ilp * _ILP, size):
        partial[0] += elems[i]
    for k in range(1, _ILP):
        partial[0] += partial[k]
    return partial[0]


def _serial_sum(x: np.ndarray, vec_width: int) -> np.float32:
    """One thread's share: torch's cascade_sum over a contiguous float32 range."""
    n = x.shape[0]
    if n < vec_width:
        return np.float32(0) + _row_sum(x)
    n_vec = n // vec_width
    lanes = _row_sum(x[: n_vec * vec_width].reshape(n_vec, vec_width))
    total = np.float32(0)
    for value in x[n_vec * vec_width :]:
        total += value
    for value in lanes:
        total += value
    return np.float32(0) + total


def torch_sum_f32(x: np.ndarray, vec_width: int, threads: int) -> np.float32:
    """`torch.sum` of a 1-D float32 array on CPU with `threads` intra-op threads."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = x.shape[0]
    if n < _GRAIN_SIZE or threads == 1:
        return _serial_sum(x, vec_width)
    used = min(threads, -(-n // _GRAIN_SIZE))
    chunk = -(-n // used)
    buffer = np.zeros(threads, dtype=np.float32)
    for t in range(used):
        buffer[t] = _serial_sum(x[t * chunk : (t + 1) * chunk], vec_width)
    return _serial_sum(buffer, vec_width)


def torch_mean_f32(x: np.ndarray, vec_width: int | None = None, threads: int | None = None) -> np.float32:
    """`tensor.mean()` of float32 data as torch computes it on this machine (sum, then one division)."""
    vec_width = vec_width or cpu_vector_width()
    threads = threads or torch_threads()
    return np.float32(torch_sum_f32(x, vec_width, threads) / np.float32(x.size))


def cpu_vector_width() -> int:
    """Lanes of torch's Vectorized<float> here: 16 when it dispatches to AVX-512, else 8."""
    forced = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if forced:
        return 16 if forced == "avx512" else 8
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return 8
    needed = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
    return 16 if needed <= set(flags) else 8


def torch_threads() -> int:
    """torch's default intra-op thread count: OMP_NUM_THREADS or MKL_NUM_THREADS, else the number of
    physical cores (torch counts cores, not hyper-threads), else the CPUs this process may use."""
    for var in ("QUANTKIT_TORCH_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return physical_cores() or len(os.sched_getaffinity(0))


def physical_cores() -> int:
    """Distinct (package, core) pairs in /proc/cpuinfo; 0 when it cannot be read."""
    cores, package = set(), "0"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    package = value.strip()
                elif key.strip() == "core id":
                    cores.add((package, value.strip()))
    except OSError:
        return 0
    return len(cores)


# ------------------------------------------------------------------------- 8- and 4-bit float codecs
# float8_e4m3fn (FP8 weights and NVFP4 scales), fp4 e2m1 (NVFP4 / MXFP4 values, two per byte, the even
# element in the low nibble) and e8m0 (MX scales: a biased power of two), as torch 2.13 on CPU and the
# compressed-tensors / transformers CPU paths compute them.

FP8_E4M3_MAX = np.float32(448.0)


def _fp8_e4m3_table() -> np.ndarray:
    codes = np.arange(256)
    exponent, mantissa = (codes >> 3) & 0xF, codes & 7
    magnitude = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent - 7.0))
    values = np.where(codes & 0x80, -magnitude, magnitude).astype(np.float32)
    values[(codes & 0x7F) == 0x7F] = np.nan
    return values


FP8_E4M3_VALUES = _fp8_e4m3_table()  # code -> value; 0x80 is -0.0, 0x7F / 0xFF NaN
FP4_E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
E8M0_VALUES = np.array([math.ldexp(1.0, e - 127) for e in range(255)] + [math.inf], np.float32)  # 0 -> 2**-127 (subnormal)


def fp8_e4m3_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> float8_e4m3fn codes as torch's `.to(torch.float8_e4m3fn)`: nearest even (subnormals in
    steps of 2**-9), the sign of zero kept, saturating (beyond 448 and +-inf give +-448), NaN -> 0x7F."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    sign = ((u >> 24) & 0x80).astype(np.uint8)
    a_bits = u & np.uint32(0x7FFFFFFF)
    a = a_bits.view(np.float32)
    # normal: exponent re-biased 127 -> 7, mantissa rounded 23 -> 3 bits to nearest even
    normal = (a_bits - np.uint32(120 << 23) + np.uint32(0x7FFFF) + ((a_bits >> 20) & 1)) >> 20
    small = a < np.float32(2.0**-6)
    subnormal = np.rint(np.where(small, a, 0) * np.float32(512.0)).astype(np.uint32)
    code = np.where(small, subnormal, normal)
    code = np.where(a > FP8_E4M3_MAX, np.uint32(0x7E), code).astype(np.uint8) | sign
    return np.where(np.isnan(a), np.uint8(0x7F), code)


def fp4_e2m1_codes(x: np.ndarray) -> np.ndarray:
    """Values clamped to [-6, 6] -> e2m1 codes (bit 3 the sign), nearest even as compressed-tensors'
    cast_to_fp4: a negative value that rounds to zero keeps its sign (code 8); -0.0 itself gives 0."""
    a = np.abs(x)
    index = ((a > 0.25).astype(np.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5) + (a > 5.0))
    return index.astype(np.uint8) | ((x < 0).astype(np.uint8) << 3)


def pack_fp4(codes: np.ndarray) -> np.ndarray:
    """[rows, cols] nibble codes -> uint8 [rows, cols / 2], the even column in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., n] -> e2m1 values float32 [..., 2n] (low nibble first)."""
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.float32)
    out[..., 0::2] = FP4_E2M1_VALUES[packed & 0x0F]
    out[..., 1::2] = FP4_E2M1_VALUES[packed >> 4]
    return out


def decode_e4m3fn(codes: np.ndarray) -> np.ndarray:
    """float8 e4m3fn codes (uint8) -> float32 values, exactly."""
    return FP8_E4M3_VALUES[np.asarray(codes).view(np.uint8)]


def decode_e8m0(codes: np.ndarray) -> np.ndarray:
    """e8m0 exponents (uint8) -> 2**(code - 127) as float32 (code 0 is the subnormal 2**-127, 255 infinity)."""
    return E8M0_VALUES[np.asarray(codes).view(np.uint8)]
