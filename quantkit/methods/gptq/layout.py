"""The GPTQ and AWQ (GEMM) checkpoint layouts: companion tensor names, int32 packing, the v1 / v2
zero-point conventions, and the `quantization_config` that loaders read.

GPTQ: `qweight` `[in / f, out]` packs f = 32 / bits codes along input features (code k of a word in
bits [k * bits, (k + 1) * bits)), `qzeros` `[groups, out / f]` packs zero points along output features
the same way, `scales` `[groups, out]` (float16 as quantkit and GPTQModel write it; bf16 or float32 as other
writers do), `g_idx` int32 `[in]` (group of each input feature).
v1 ("gptq") stores every zero point minus one, v2 ("gptq_v2") stores it as is.
AWQ GEMM (4-bit): `qweight` `[in, out / 8]` and `qzeros` `[groups, out / 8]` pack along output
features with the interleave below, zero points as is, `scales` `[groups, out]` (GPTQModel writes them
in the model's dtype: bf16 from a bf16 model).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantkit import __version__, dtypes
from quantkit.errors import QuantkitError
from quantkit.io.staged import replace_json
from quantkit.methods.gptq import groupwise

COMPANIONS = ("qweight", "qzeros", "scales", "g_idx")
AWQ_COMPANIONS = ("qweight", "qzeros", "scales")
SCALE_DTYPES = ("F16", "BF16", "F32")  # what real writers store scales in; readers decode each as declared
CHECKPOINT_FORMATS = {"v1": "gptq", "v2": "gptq_v2"}
VERSIONS = {name: version for version, name in CHECKPOINT_FORMATS.items()}
AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # nibble k of an AWQ word holds column AWQ_ORDER[k]
_V1_OFFSET = 1


@dataclass(frozen=True)
class GptqConfig:
    """What a checkpoint's `quantization_config` says about its packed weights."""

    method: str  # "gptq" or "awq"
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    version: str | None  # "v1" / "v2" for GPTQ, None for AWQ (zero points as is)


# ---- packing ------------------------------------------------------------------------------------


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """`[n, m]` codes -> int32 `[n / f, m]`, f = 32 / bits consecutive rows to a word, lowest bits first."""
    per_word = groupwise.PACK_BITS // bits
    n, m = codes.shape
    fields = codes.astype(np.uint32).reshape(n // per_word, per_word, m)
    shifts = (np.arange(per_word, dtype=np.uint32) * np.uint32(bits))[None, :, None]
    return np.bitwise_or.reduce(fields << shifts, axis=1).view(np.int32)


def unpack_rows(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack_rows`: int32 `[n / f, m]` -> uint8 `[n, m]`."""
    per_word = groupwise.PACK_BITS // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * np.uint32(bits))[None, :, None]
    fields = (words.view(np.uint32)[:, None, :] >> shifts) & np.uint32(2**bits - 1)
    return fields.reshape(-1, words.shape[1]).astype(np.uint8)


def pack_columns(values: np.ndarray, bits: int) -> np.ndarray:
    """`[n, m]` -> int32 `[n, m / f]`, f consecutive columns to a word, lowest bits first."""
    return np.ascontiguousarray(pack_rows(values.T, bits).T)


def unpack_columns(words: np.ndarray, bits: int) -> np.ndarray:
    return np.ascontiguousarray(unpack_rows(np.ascontiguousarray(words.T), bits).T)


# ---- GPTQ tensors --------------------------------------------------------------------------------


def pack_qweight(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes of output rows `[rows, in]` -> their `qweight` columns `[in / f, rows]`."""
    return pack_rows(np.ascontiguousarray(codes.T), bits)


def pack_qzeros(zeros: np.ndarray, bits: int, version: str) -> np.ndarray:
    """Zero points `[out, groups]` -> `qzeros` `[groups, out / f]`, minus one for v1."""
    stored = zeros.T.astype(np.int64)
    if version == "v1":
        if np.any(stored < _V1_OFFSET):
            raise QuantkitError("GPTQ v1 cannot store a zero point of 0", "write --format v2")
        stored = stored - _V1_OFFSET
    return pack_columns(stored.astype(np.uint8), bits)


def group_index(in_features: int, group_size: int) -> np.ndarray:
    """`g_idx` without act-order: input feature i belongs to group i // group_size."""
    size = in_features if group_size == -1 else group_size
    return (np.arange(in_features) // size).astype(np.int32)


def zero_points(qzeros: np.ndarray, bits: int, version: str | None) -> np.ndarray:
    """True zero points `[groups, out]` (int64) from stored `qzeros`; v1 stores them minus one."""
    stored = unpack_columns(qzeros, bits).astype(np.int64)
    return stored + _V1_OFFSET if version == "v1" else stored


def dequantize_gptq(tensors: dict[str, np.ndarray], bits: int, version: str, module: str) -> np.ndarray:
    """float32 `[out, in]` weight from GPTQ companions (either version, act-order `g_idx` included)."""
    check_gptq(tensors, bits, module)
    g_idx = tensors["g_idx"].astype(np.int64)
    codes = unpack_rows(tensors["qweight"], bits).astype(np.float32)  # [in, out]
    zeros = zero_points(tensors["qzeros"], bits, version).astype(np.float32)
    scales = tensors["scales"].astype(np.float32)
    return np.ascontiguousarray(((codes - zeros[g_idx]) * scales[g_idx]).T)


def check_gptq(tensors: dict[str, np.ndarray], bits: int, module: str) -> None:
    """Raise naming the module unless its read companions fit together (dtypes, shapes, g_idx in range)."""
    problem = companion_problem({part: (dtypes.NAME_OF_ARRAY.get(t.dtype, str(t.dtype)), t.shape) for part, t in tensors.items()}, bits)
    problem = problem or g_idx_problem(tensors["g_idx"], tensors["scales"].shape[0])
    if problem:
        raise QuantkitError(f"{module}: {problem}")


def g_idx_problem(g_idx: np.ndarray, groups: int) -> str | None:
    if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= groups):
        return f"g_idx points outside the {groups} groups"
    return None


def companion_problem(parts: dict[str, tuple[str, tuple[int, ...]]], bits: int, group_size: int | None = None) -> str | None:
    """What is wrong with a module's GPTQ companions, given each one's (safetensors dtype, shape), or None.

    Without `group_size` the group count is taken from `scales`; with it, it must match.
    """
    missing = [part for part in COMPANIONS if part not in parts]
    if missing:
        return f"missing {', '.join(missing)}"
    for part, want in (("qweight", ("I32",)), ("qzeros", ("I32",)), ("scales", SCALE_DTYPES), ("g_idx", ("I32",))):
        if parts[part][0] not in want:
            return f"{part} is {parts[part][0]}, expected {' or '.join(want)}"
    per_word = groupwise.PACK_BITS // bits
    qweight, scales = parts["qweight"][1], parts["scales"][1]
    if len(qweight) != 2 or len(scales) != 2:
        return "qweight and scales must be 2-D"
    in_features, out_features = qweight[0] * per_word, qweight[1]
    groups = scales[0] if group_size is None else groupwise.n_groups(in_features, group_size)
    expected = {"scales": (groups, out_features), "qzeros": (groups, out_features // per_word), "g_idx": (in_features,)}
    for part, shape in expected.items():
        if tuple(parts[part][1]) != shape:
            return f"{part} has shape {list(parts[part][1])}, expected {list(shape)} at {bits} bits"
    return None


# ---- v1 <-> v2 ------------------------------------------------------------------------------------


def convert_qzeros(qzeros: np.ndarray, bits: int, source: str, target: str, module: str) -> np.ndarray:
    """Rewrite stored zero points from one GPTQ version to the other (a no-op when they agree)."""
    if source == target:
        return qzeros
    zeros = zero_points(qzeros, bits, source)
    stored = zeros - _V1_OFFSET if target == "v1" else zeros
    if np.any(stored < 0):
        raise QuantkitError(
            f"{module}: a zero point is 0, which GPTQ v1 cannot store", "keep this checkpoint in v2"
        )
    if np.any(stored > 2**bits - 1):
        raise QuantkitError(f"{module}: a v1 zero point field holds {2**bits - 1}, which no loader can read back")
    return pack_columns(stored.astype(np.uint8), bits)


def infer_version(qzeros: np.ndarray, bits: int, sym: bool) -> str | None:
    """The GPTQ version the stored zero points themselves prove, or None when they cannot tell.

    Symmetric: every zero point is 2**(bits-1), stored as such in v2 and minus one in v1.
    Asymmetric: only a field at the top of the range proves v2 (in v1 it would mean 2**bits).
    """
    stored = unpack_columns(qzeros, bits)
    if stored.size == 0:
        return None
    mid = 2 ** (bits - 1)
    if sym:
        if np.all(stored == mid):
            return "v2"
        if np.all(stored == mid - 1):
            return "v1"
        return None
    return "v2" if np.any(stored == 2**bits - 1) else None


# ---- AWQ GEMM -----------------------------------------------------------------------------------


def unpack_awq(words: np.ndarray) -> np.ndarray:
    """AWQ 4-bit words `[n, m / 8]` -> codes `[n, m]` in natural column order."""
    nibbles = unpack_columns(words, 4).reshape(words.shape[0], -1, 8)
    natural = np.empty_like(nibbles)
    natural[:, :, AWQ_ORDER] = nibbles
    return natural.reshape(words.shape[0], -1)


def pack_awq(codes: np.ndarray) -> np.ndarray:
    """Inverse of `unpack_awq` (used by tests and by nothing that writes AWQ)."""
    grouped = codes.reshape(codes.shape[0], -1, 8)[:, :, AWQ_ORDER]
    return pack_columns(grouped.reshape(codes.shape[0], -1), 4)


def check_awq(tensors: dict[str, np.ndarray], group_size: int, module: str) -> None:
    """Raise naming the module unless its AWQ companions are there and fit together (shapes, unpacked)."""
    missing = [part for part in AWQ_COMPANIONS if part not in tensors]
    if missing:
        raise QuantkitError(f"{module}: missing {', '.join(missing)}")
    qweight, qzeros, scales = (tensors[part] for part in AWQ_COMPANIONS)
    if qweight.ndim != 2 or qzeros.ndim != 2 or scales.ndim != 2:
        raise QuantkitError(f"{module}: AWQ qweight, qzeros and scales must be 2-D")
    codes, zeros = (qweight.shape[0], qweight.shape[1] * 8), (qzeros.shape[0], qzeros.shape[1] * 8)
    size = codes[0] if group_size == -1 else group_size
    if scales.shape != zeros or scales.shape[0] * size != codes[0] or scales.shape[1] != codes[1]:
        raise QuantkitError(f"{module}: AWQ scales {list(scales.shape)} do not fit qweight {list(codes)}")


def dequantize_awq(tensors: dict[str, np.ndarray], group_size: int, module: str) -> np.ndarray:
    """float32 `[out, in]` weight from AWQ GEMM companions."""
    check_awq(tensors, group_size, module)
    codes = unpack_awq(tensors["qweight"]).astype(np.float32)  # [in, out]
    zeros = unpack_awq(tensors["qzeros"]).astype(np.float32)  # [groups, out]
    scales = tensors["scales"].astype(np.float32)
    group = group_index(codes.shape[0], group_size)
    return np.ascontiguousarray(((codes - zeros[group]) * scales[group]).T)


# ---- config -------------------------------------------------------------------------------------


def quantization_config(
    bits: int, group_size: int, sym: bool, version: str, dense_modules: tuple[str, ...] = ()
) -> dict:
    """config.json's `quantization_config` for what the quantizer writes (quantizer.Gptq).

    Modules left dense inside the quantized blocks are excluded through GPTQModel's `dynamic` rules
    (`-:` + a regex of the full module name); the output head is never quantized (`lm_head: false`).
    """
    fmt = CHECKPOINT_FORMATS[version]
    config = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": sym,
        "checkpoint_format": fmt,
        "format": fmt,
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": {"quantizer": [f"quantkit:{__version__}"]},
    }
    if dense_modules:
        config["dynamic"] = {f"-:^{re.escape(name)}$": {} for name in dense_modules}
    return config


def read_config(config: dict, where: str = "config.json") -> GptqConfig | None:
    """The GPTQ / AWQ settings of a `quantization_config`, None when it is some other method."""
    method = str(config.get("quant_method", "")).lower()
    if method not in ("gptq", "awq"):
        return None
    bits = config.get("bits", config.get("w_bit"))
    group_size = config.get("group_size", config.get("q_group_size"))
    if not isinstance(bits, int) or not isinstance(group_size, int) or isinstance(bits, bool) or isinstance(group_size, bool):
        raise QuantkitError(f"{where}: quantization_config needs integer bits and group_size, not {bits!r} and {group_size!r}")
    if group_size != -1 and group_size < 1:
        raise QuantkitError(f"{where}: quantization_config group_size {group_size} is neither -1 nor positive")
    if method == "awq":
        version_name = str(config.get("version", "gemm")).lower()
        if version_name != "gemm" or bits != 4:
            raise QuantkitError(f"{where}: only 4-bit AWQ GEMM is supported, not {bits}-bit {version_name}")
        return GptqConfig("awq", bits, group_size, not config.get("zero_point", True), False, None)
    if bits not in groupwise.SUPPORTED_BITS:
        raise QuantkitError(f"{where}: {bits}-bit GPTQ is not supported", f"supported: {groupwise.SUPPORTED_BITS}")
    fmt = config.get("checkpoint_format", config.get("format", "gptq"))
    if fmt not in VERSIONS:
        raise QuantkitError(f"{where}: unknown GPTQ checkpoint_format {fmt!r}", "expected gptq or gptq_v2")
    return GptqConfig("gptq", bits, group_size, bool(config.get("sym", True)), bool(config.get("desc_act")), VERSIONS[fmt])


def with_version(config: dict, version: str) -> dict:
    """The same `quantization_config` declaring `version`: `checkpoint_format` and `format` both."""
    fmt = CHECKPOINT_FORMATS[version]
    return dict(config, checkpoint_format=fmt, format=fmt)


def rewrite_quantize_config(path: Path, version: str) -> bool:
    """GPTQModel also writes quantize_config.json; it must declare the same format as config.json.
    True when the file was rewritten."""
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    if not isinstance(config, dict) or config.get("quant_method", "gptq") != "gptq" or config == with_version(config, version):
        return False
    replace_json(path, with_version(config, version))
    return True
