"""Throughput of our GGUF quantizers against gguf-py's own (Q8_0 and the legacy types) and, when
llama-cpp-python is installed, llama.cpp's reference quantizers (one thread).

    python scripts/bench_gguf.py [--mb 64] [--json]
    python scripts/bench_gguf.py --checkpoint DIR [--json]   # whole `quantkit convert --to gguf`
        (a fresh process, start-up, reading, writing and fsync included) against gguf-py quantizing
        the same tensors in-process (reading included, writing not)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from quantkit.methods.gguf import types as ggml


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


def convert_vs_gguf_py(checkpoint: str) -> dict:
    from quantkit.dtypes import to_float32
    from quantkit.io.safetensors import ShardReader
    from quantkit.io.source import open_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "quantkit", "convert", checkpoint, f"{tmp}/m.gguf", "--to", "gguf",
                        "--gguf-type", "Q8_0", "--json"], check=True, stdout=subprocess.DEVNULL)
        ours = time.perf_counter() - start
    ck = open_checkpoint(Path(checkpoint))
    start = time.perf_counter()
    for file in ck.files:
        with ShardReader(file) as reader:
            for info in (i for i in ck.tensors.values() if i.file == file):
                values = to_float32(reader.read(info), info.dtype)
                if values.ndim == 2:
                    gguf.quants.quantize(values, Q.Q8_0)
    theirs = time.perf_counter() - start
    return {"quantkit_convert_s": round(ours, 2), "gguf_py_quantize_s": round(theirs, 2),
            "speedup": round(theirs / ours, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=64, help="float32 megabytes to quantize")
    parser.add_argument("--checkpoint", help="time a whole Q8_0 conversion of this safetensors checkpoint")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.checkpoint:
        print(json.dumps(convert_vs_gguf_py(args.checkpoint)))
        return
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
