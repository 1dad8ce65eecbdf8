"""`inspect`: what a checkpoint is and what quantizing it would give, from config and headers only."""

from __future__ import annotations

import math
from collections import Counter

from quantkit.dtypes import FLOATS
from quantkit.errors import QuantkitError
from quantkit.plan import QuantOptions, dequantizer_for, make_plan, num_parameters, source_bytes
from quantkit.source import Checkpoint, open_checkpoint, resolve

PLAN_METHODS = ("nf4", "fp4", "int8")


def describe_quantization(qc: dict | None) -> dict | None:
    """The method and its salient settings, from a quantization_config."""
    if qc is None:
        return None
    method = qc.get("quant_method")
    if method == "bitsandbytes":
        if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
            return {"method": qc.get("bnb_4bit_quant_type", "fp4"), "double_quant": qc.get("bnb_4bit_use_double_quant", False),
                    "compute_dtype": qc.get("bnb_4bit_compute_dtype"), "quant_storage": qc.get("bnb_4bit_quant_storage", "uint8")}  # fmt: skip
        return {"method": "int8", "threshold": qc.get("llm_int8_threshold")}
    if method in ("gptq", "awq"):
        fmt = qc.get("checkpoint_format") or qc.get("format") or qc.get("version")
        fmt = {"gptq": "v1", "gptq_v2": "v2"}.get(fmt, fmt)
        return {"method": method, "bits": qc.get("bits"), "group_size": qc.get("group_size"), "sym": qc.get("sym"),
                "format": fmt, "desc_act": qc.get("desc_act")}  # fmt: skip
    return {"method": method}


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


def size_plan(checkpoint: Checkpoint) -> dict[str, int] | None:
    if checkpoint.quantization_config is not None:
        return None
    sizes = {}
    for method in PLAN_METHODS:
        try:
            sizes[method] = make_plan(checkpoint, QuantOptions(method=method)).output_bytes
        except QuantkitError:
            sizes[method] = None
    return sizes


def inspect(src: str, revision: str | None = None) -> dict:
    path = resolve(src, revision)
    if path.is_file() and path.suffix == ".gguf":
        from quantkit.formats import gguf

        return gguf.inspect_file(path)
    from quantkit.formats import torchbin

    if torchbin.is_torch_checkpoint(path):
        return torchbin.inspect(path)
    checkpoint = open_checkpoint(path)
    qc = checkpoint.quantization_config
    dtypes = Counter(info.dtype for info in checkpoint.tensors.values())
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
        "plan_bytes": size_plan(checkpoint),
        "tensors": [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in checkpoint.tensors.values()],
    }

