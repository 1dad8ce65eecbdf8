"""Throughput of our GGUF quantizers against gguf-py's own (Q8_0 and the legacy types) and, when
llama-cpp-python is installed, llama.cpp's reference K-quant quantizer (one thread).

    python scripts/bench_gguf.py [--mb 64] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from quantkit.schemes import ggml


def _rate(fn, x: np.ndarray, repeat: int = 2) -> float:
    fn(x[:256])  # compile / warm up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best / 1e6


def _llama_cpp_quantizer(qtype: Q):
    try:
        import llama_cpp
    except ImportError:
        return None
    lib = ctypes.CDLL(str(min((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))))
    fn = getattr(lib, f"quantize_row_{qtype.name.lower().replace('_k', '_K')}_ref")
    block, size = GGML_QUANT_SIZES[qtype]

    def run(x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty(x.size // block * size, dtype=np.uint8)
        fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
        return out

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=64, help="float32 megabytes to quantize")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    x = np.random.default_rng(0).standard_normal(((args.mb << 20) // 4 // 4096, 4096)).astype(np.float32)
    results = {}
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q6_K):
        row = {"quantkit_MBps": _rate(lambda a, q=qtype: ggml.quantize(a, q), x)}
        if qtype in ggml.LEGACY_TYPES:
            row["gguf_py_MBps"] = _rate(lambda a, q=qtype: gguf.quants.quantize(a, q), x)
        llama = _llama_cpp_quantizer(qtype)
        if llama is not None:
            row["llama_cpp_ref_MBps"] = _rate(llama, x)
        results[qtype.name] = {k: round(v, 1) for k, v in row.items()}
    if args.json:
        print(json.dumps(results))
        return
    for name, row in results.items():
        ratio = f"  ({row['quantkit_MBps'] / row['gguf_py_MBps']:.1f}x gguf-py)" if "gguf_py_MBps" in row else ""
        print(f"{name:5} " + "  ".join(f"{k}={v}" for k, v in row.items()) + ratio)


if __name__ == "__main__":
    main()
