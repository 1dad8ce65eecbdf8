"""Block geometry of ggml's types: bytes per row, whether a row holds whole blocks, stored shapes."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantkit.errors import QuantkitError

QType = GGMLQuantizationType


def row_bytes(qtype: QType, row_length: int) -> int:
    """Bytes one row of `row_length` values takes in `qtype`; rows must hold whole blocks."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if row_length % block_size:
        raise QuantkitError(
            f"a row of {row_length} values does not hold whole {qtype.name} blocks of {block_size}",
            "pick a type whose block size divides the row length",
        )
    return row_length // block_size * type_size


def fits(qtype: QType, row_length: int) -> bool:
    return row_length % GGML_QUANT_SIZES[qtype][0] == 0


def layout(qtype: QType, shape: tuple[int, ...]) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape) of the stored array for a tensor of `shape` (numpy order, rows last), without data."""
    if qtype == QType.F32:
        return np.dtype(np.float32), tuple(shape)
    if qtype == QType.F16:
        return np.dtype(np.float16), tuple(shape)
    return np.dtype(np.uint8), (*shape[:-1], row_bytes(qtype, shape[-1]))
