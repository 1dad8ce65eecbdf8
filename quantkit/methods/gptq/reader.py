"""Reading GPTQ and AWQ (GEMM) checkpoints back: their modules, dense values, and verify's checks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from quantkit import dtypes
from quantkit.api import IntegerBlocks, TensorSink, read_floats
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import OutputTensor, ShardReader
from quantkit.io.source import Checkpoint
from quantkit.io.staged import replace_json
from quantkit.methods.gptq import groupwise, native
from quantkit.methods.gptq.integers import from_qweight, to_integers
from quantkit.methods.gptq.layout import (
    AWQ_COMPANIONS,
    CHECKPOINT_FORMATS,
    COMPANIONS,
    SCALE_DTYPES,
    GptqConfig,
    check_awq,
    check_gptq,
    companion_problem,
    dequantize_awq,
    dequantize_gptq,
    g_idx_problem,
    group_index,
    infer_version,
    read_config,
    rewrite_quantize_config,
    unpack_awq,
    with_version,
    zero_points,
)
from quantkit.methods.gptq.quantizer import GptqOptions
from quantkit.modules import is_conv1d
from quantkit.native import DENSE
from quantkit.numerics import CHUNK_ELEMENTS

# Relative weight error (||W - W'|| / ||W||) above which a layer fails, per scheme.
ERROR_BOUND = {"gptq-8": 0.05, "gptq-4": 0.25, "gptq-3": 0.4, "gptq-2": 0.8, "awq-4": 0.25}


def checkpoint_config(checkpoint: Checkpoint) -> GptqConfig:
    config = read_config(checkpoint.quantization_config or {}, str(checkpoint.root / "config.json"))
    if config is None:
        raise QuantkitError(f"{checkpoint.root / 'config.json'}: not a GPTQ or AWQ checkpoint")
    return config


def stored_version(checkpoint: Checkpoint, module: str, config: GptqConfig) -> str | None:
    """v1 or v2, as the module's zero points prove it (None when they cannot tell)."""
    return infer_version(read_tensor(checkpoint, f"{module}.qzeros"), config.bits, config.sym)


def read_tensor(checkpoint: Checkpoint, name: str) -> np.ndarray:
    info = checkpoint.tensors[name]
    with ShardReader(info.file) as reader:
        return reader.read(info)


def _write_rows(sink: TensorSink, name: str, values: np.ndarray, stored: Callable[[np.ndarray], np.ndarray]) -> None:
    """`values` (a transposed view, maybe) written to `name` in row chunks, each made contiguous and `stored`."""
    rows = max(1, CHUNK_ELEMENTS // values.shape[1])
    for start in range(0, values.shape[0], rows):
        sink.write(name, stored(np.ascontiguousarray(values[start : start + rows])))
    sink.done(name)


class GptqReader:
    """Dequantizer and checker for checkpoints whose quant_method is "gptq"."""

    quant_method = "gptq"
    parts = COMPANIONS

    def modules(self, checkpoint: Checkpoint) -> dict[str, list[str]]:
        found = {}
        for name in checkpoint.tensors:
            if name.endswith(".qweight"):
                module = name.removesuffix(".qweight")
                found[module] = [f"{module}.{part}" for part in self.parts if f"{module}.{part}" in checkpoint.tensors]
        return found

    def scheme(self, checkpoint: Checkpoint) -> str:
        config = checkpoint_config(checkpoint)
        return f"{config.method}-{config.bits}"

    def options(self, checkpoint: Checkpoint) -> GptqOptions | None:
        config = checkpoint_config(checkpoint)
        if config.method != "gptq":
            return None  # AWQ is read, not written
        return GptqOptions(method=config.method, bits=config.bits, group_size=config.group_size, sym=config.sym,
                            format=config.version)  # fmt: skip

    def describe(self, qc: dict) -> dict:
        fmt = qc.get("checkpoint_format") or qc.get("format") or qc.get("version")
        fmt = {"gptq": "v1", "gptq_v2": "v2"}.get(fmt, fmt)
        return {"method": self.quant_method, "bits": qc.get("bits"), "group_size": qc.get("group_size"), "sym": qc.get("sym"),
                "format": fmt, "desc_act": qc.get("desc_act")}  # fmt: skip

    def error_bound(self, scheme: str) -> float:
        return ERROR_BOUND.get(scheme, 0.3)

    def default_dtype(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> str | None:
        return None  # scales' dtype need not be the model's (quantkit writes float16); config.json's says more

    def layout(self, checkpoint: Checkpoint, module: str, names: list[str], dtype: str) -> list[OutputTensor]:
        config = checkpoint_config(checkpoint)
        rows, cols = checkpoint.tensors[f"{module}.qweight"].shape
        per_word = groupwise.PACK_BITS // config.bits
        shape = (cols, rows * per_word) if config.method == "gptq" else (cols * per_word, rows)
        return [OutputTensor(f"{module}.weight", dtype, shape[::-1] if is_conv1d(checkpoint.config, module) else shape)]

    def dequantize(self, checkpoint: Checkpoint, module: str, names: list[str], read: Callable[[str], np.ndarray],
                   dtype: str, sink: TensorSink) -> None:  # fmt: skip
        config = checkpoint_config(checkpoint)
        missing = [part for part in self.parts if f"{module}.{part}" not in names]
        if missing:
            raise QuantkitError(f"{module}: missing {', '.join(missing)}")
        tensors = {part: read(f"{module}.{part}") for part in self.parts if part != "scales"}
        scales = checkpoint.tensors[f"{module}.scales"]
        if scales.dtype not in SCALE_DTYPES:
            raise QuantkitError(f"{scales.file}: tensor '{scales.name}' is {scales.dtype}, expected {' or '.join(SCALE_DTYPES)}")
        tensors["scales"] = read_floats(checkpoint, read, scales.name)
        name = f"{module}.weight"
        conv1d = is_conv1d(checkpoint.config, module)  # GPT-2's Conv1D stores [in, out]
        awq = config.method == "awq"
        if self._kernel_fits(tensors, config.bits, awq, dtype):
            if awq:
                check_awq(tensors, config.group_size, module)
                tensors["g_idx"] = group_index(tensors["qweight"].shape[0], config.group_size)
            else:
                check_gptq(tensors, config.bits, module)
            out_features, in_features = tensors["scales"].shape[1], tensors["g_idx"].shape[0]
            if conv1d:  # the whole module's rows, written transposed: the same bits as the reference's transpose
                dense = native.dense_rows(tensors, config.bits, config.version, 0, out_features, dtype, awq)
                _write_rows(sink, name, dense.T, lambda rows: rows)
                return
            rows = max(1, CHUNK_ELEMENTS // in_features)
            for start in range(0, out_features, rows):
                count = min(rows, out_features - start)
                sink.write(name, native.dense_rows(tensors, config.bits, config.version, start, count, dtype, awq))
            sink.done(name)
            return
        if awq:
            values = dequantize_awq(tensors, config.group_size, module)
        else:
            values = dequantize_gptq(tensors, config.bits, config.version, module)
        _write_rows(sink, name, values.T if conv1d else values, lambda rows: dtypes.from_float32(rows, dtype))

    @staticmethod
    def _kernel_fits(tensors: dict[str, np.ndarray], bits: int, awq: bool, dtype: str) -> bool:
        """Whether native.dense_rows takes this module (else layout.dequantize_gptq / dequantize_awq, the
        references, do): int32 words, and (GPTQ) output features packing whole qzeros words."""
        qweight, qzeros = tensors["qweight"], tensors["qzeros"]
        if not native.DENSE_AVAILABLE or dtype not in DENSE or qweight.dtype != np.int32 or qzeros.dtype != np.int32:
            return False
        return qweight.ndim == 2 and qweight.shape[1] > 0 and (awq or qweight.shape[1] % (groupwise.PACK_BITS // bits) == 0)

    def integers(self, checkpoint: Checkpoint, module: str, names: list[str],
                 read: Callable[[str], np.ndarray]) -> IntegerBlocks | None:
        """The module as IntegerBlocks when its groups allow (no act-order, zero points mid or mid - 1,
        scales that are float16 values), else None."""
        config = checkpoint_config(checkpoint)
        part = {p: checkpoint.tensors[f"{module}.{p}"] for p in self.parts}
        scales = dtypes.to_float32(read(f"{module}.scales"), part["scales"].dtype)
        if not np.array_equal(scales.astype(np.float16).astype(np.float32), scales):
            return None
        if config.method == "awq":
            codes, zeros = unpack_awq(read(f"{module}.qweight")), unpack_awq(read(f"{module}.qzeros"))
            group = codes.shape[0] if config.group_size == -1 else config.group_size
            return to_integers(np.ascontiguousarray(codes.T), zeros.T, scales.T.astype(np.float16), config.bits, group)
        qweight = read(f"{module}.qweight")
        in_features = qweight.shape[0] * (groupwise.PACK_BITS // config.bits)
        if not np.array_equal(read(f"{module}.g_idx"), group_index(in_features, config.group_size)):
            return None  # act-order: the groups are not runs of inputs
        zeros = zero_points(read(f"{module}.qzeros"), config.bits, config.version)
        group = in_features if config.group_size == -1 else config.group_size
        return from_qweight(qweight, zeros.T, scales.T.astype(np.float16), config.bits, group)

    def check(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> list[str]:
        try:
            config = checkpoint_config(checkpoint)
        except QuantkitError as e:
            return [e.message]
        problems = []
        for module in modules:
            parts = {p: checkpoint.tensors[f"{module}.{p}"] for p in self.parts if f"{module}.{p}" in checkpoint.tensors}
            if config.method == "awq":
                problems += self._check_awq(module, parts, config)
                continue
            problem = companion_problem({p: (i.dtype, i.shape) for p, i in parts.items()}, config.bits,
                                        config.group_size)  # fmt: skip
            if problem:
                problems.append(f"'{module}': {problem}")
                continue
            problem = g_idx_problem(read_tensor(checkpoint, f"{module}.g_idx"), parts["scales"].shape[0])
            if problem:
                problems.append(f"'{module}': {problem}")
            found = stored_version(checkpoint, module, config)
            if found and found != config.version:
                problems.append(
                    f"'{module}': zero points are stored as GPTQ {found} but config.json declares "
                    f"checkpoint_format {CHECKPOINT_FORMATS[config.version]!r} ({config.version}); verify --fix declares what the data holds"
                )
        return problems

    def fix(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> list[str]:
        """Declare the zero-point format every module's data proves (config.json, quantize_config.json);
        nothing when the modules disagree among themselves or cannot tell."""
        config = checkpoint_config(checkpoint)
        if config.method != "gptq":
            return []
        found = {stored_version(checkpoint, m, config) for m in modules if f"{m}.qzeros" in checkpoint.tensors} - {None}
        if len(found) != 1 or found == {config.version}:
            return []
        version = found.pop()
        declared = with_version(checkpoint.quantization_config, version)
        replace_json(checkpoint.root / "config.json", dict(checkpoint.config, quantization_config=declared))
        changed = [f"config.json: checkpoint_format and format {CHECKPOINT_FORMATS[config.version]!r} -> "
                   f"{CHECKPOINT_FORMATS[version]!r} (the zero points are stored as GPTQ {version})"]
        if rewrite_quantize_config(checkpoint.root / "quantize_config.json", version):
            changed.append(f"quantize_config.json: the same, {CHECKPOINT_FORMATS[version]!r}")
        return changed

    def _check_awq(self, module: str, parts: dict, config: GptqConfig) -> list[str]:
        missing = [p for p in AWQ_COMPANIONS if p not in parts]
        if missing:
            return [f"'{module}': missing {', '.join(missing)}"]
        rows, cols = parts["qweight"].shape
        groups = groupwise.n_groups(rows, config.group_size)
        expected = {"qzeros": (("I32",), (groups, cols)), "scales": (SCALE_DTYPES, (groups, cols * 8)),
                    "qweight": (("I32",), (rows, cols))}
        return [
            f"'{module}.{p}': {parts[p].dtype}{list(parts[p].shape)}, expected {' or '.join(d)}{list(shape)}"
            for p, (d, shape) in expected.items() if parts[p].dtype not in d or parts[p].shape != shape
        ]  # fmt: skip


class AwqReader(GptqReader):
    """The same for AWQ GEMM checkpoints (quant_method "awq"): other packing, no g_idx."""

    quant_method = "awq"
    parts = AWQ_COMPANIONS
