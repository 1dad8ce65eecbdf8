"""`inspect`: what a checkpoint is and what quantizing it would give, from config and headers only."""

from __future__ import annotations

import math
from collections import Counter

from quantkit import api, methods
from quantkit.dtypes import FLOATS
from quantkit.errors import QuantkitError
from quantkit.io.source import Checkpoint, open_checkpoint, resolve
from quantkit.plan import dequantizer_for, num_parameters, source_bytes
from quantkit.preview import size_table


def describe_quantization(qc: dict | None) -> dict | None:
    """The method and its salient settings, from a quantization_config (as its reader describes them)."""
    if qc is None:
        return None
    method = qc.get("quant_method")
    reader = api.DEQUANTIZERS.get(method) if isinstance(method, str) else None
    return reader.describe(qc) if reader else {"method": method}


def logical_parameters(checkpoint: Checkpoint) -> int:
    """Parameters of the model the checkpoint holds: quantized weights count at their dense shape, their
    companions (absmax, scales, ...) not at all."""
    if checkpoint.quantization_config is None:
        return num_parameters(checkpoint)
    try:
        dequantizer = dequantizer_for(checkpoint)
        modules = dequantizer.modules(checkpoint)
        dense = sum(math.prod(dequantizer.layout(checkpoint, m, names, "F32")[0].shape) for m, names in modules.items())
    except QuantkitError:
        return num_parameters(checkpoint)
    quantized = {n for names in modules.values() for n in names}
    return dense + sum(i.numel for n, i in checkpoint.tensors.items() if n not in quantized and i.dtype in FLOATS)


def inspect(src: str, revision: str | None = None) -> dict:
    path = resolve(src, revision)
    methods.load()
    file_format = api.file_format_of(path)
    if file_format is not None:
        return file_format.inspect(path)
    checkpoint = open_checkpoint(path)
    qc = checkpoint.quantization_config
    dtypes = Counter(info.dtype for info in checkpoint.tensors.values())
    plans = size_table(checkpoint) if qc is None else []
    return {
        "path": str(checkpoint.root),
        "format": "safetensors",
        "architecture": checkpoint.architecture,
        "model_type": checkpoint.config.get("model_type"),
        "num_parameters": logical_parameters(checkpoint),
        "bytes": source_bytes(checkpoint),
        "dtypes": dict(dtypes),
        "shards": [f.name for f in checkpoint.files],
        "quant_method": qc.get("quant_method") if qc else None,
        "quantization": describe_quantization(qc),
        "quantization_config": qc,
        "plans": plans,
        "plan_bytes": {row["label"]: row["output_bytes"] for row in plans},
        "tensors": [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in checkpoint.tensors.values()],
    }

