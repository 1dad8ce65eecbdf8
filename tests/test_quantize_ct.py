"""quantize --method fp8 | fp8-block | w4a16 | w4a16-asym | w8a16 | nvfp4a16 | mxfp4a16 (compressed-tensors):
the layout and config, values that compressed-tensors' own decompression gives back bit for bit, transformers
loading our output, dequantize / inspect / verify, and the C kernel against the numpy reference.
Byte identity with llm-compressor itself is tests/clients/test_llmcompressor.py (make test-clients)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme

from quantkit import dtypes
from quantkit.methods.ct import native, schemes
from quantkit.methods.ct.quantizer import CompressedTensors
from quantkit.numerics import FP8_E4M3_VALUES, fp8_e4m3_bits
from tests.conftest import load_tensors

METHODS = ("fp8", "fp8-block", "w4a16", "w4a16-asym", "w8a16", "nvfp4a16", "mxfp4a16")
# intermediate 320 is not a multiple of 128: down_proj does not fit the integer groups nor FP8 blocks
NARROW = {"fp8-block", "w4a16", "w4a16-asym", "w8a16"}
BOUND = {"fp8": 0.05, "fp8-block": 0.05, "w4a16": 0.15, "w4a16-asym": 0.12, "w8a16": 0.01, "nvfp4a16": 0.2, "mxfp4a16": 0.3}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A bf16 Llama with weights whose rows span orders of magnitude, in the Hugging Face cache layout's spirit:
    hidden 256, intermediate 320 (not a multiple of 128)."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=256, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(torch.exp(torch.randn(p.shape[0], 1) * 1.5).to(torch.bfloat16) * 5)
    folder = tmp_path_factory.mktemp("ct") / "llama"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def quantized(llama, tmp_path_factory):
    """method -> (folder, stderr of the quantize run), each written once through the CLI."""
    from typer.testing import CliRunner

    from quantkit.cli import app

    root, runs = tmp_path_factory.mktemp("ct-out"), {}

    def get(method: str):
        if method not in runs:
            result = CliRunner().invoke(app, ["quantize", str(llama), str(root / method), "--method", method])
            assert result.exit_code == 0, result.stderr
            runs[method] = (root / method, result.stderr)
        return runs[method]

    return get


def library_decompress(folder, module: str) -> torch.Tensor:
    """compressed-tensors' own decompression of one module of our checkpoint."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    tensors = load_tensors(folder)
    state = {p: tensors[f"{module}.{p}"] for p in compressor.compression_param_names(scheme) if f"{module}.{p}" in tensors}
    return compressor.decompress(state, scheme)["weight"]


@pytest.mark.parametrize("method", METHODS)
def test_library_decompresses_our_output_to_our_dequantized_values(quantized, llama, tmp_path, cli, method):
    folder, stderr = quantized(method)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    scheme = schemes.SCHEMES[method]
    assert (qc["quant_method"], qc["format"], list(qc["config_groups"])) == ("compressed-tensors", scheme.format, [scheme.name])
    narrow = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    if method in NARROW:
        assert stderr.count("kept dense") == 1 and all(m in stderr for m in narrow), stderr
        assert qc["ignore"] == sorted(["lm_head", *narrow])
    else:
        assert "kept dense" not in stderr and qc["ignore"] == ["lm_head"]
    code, _, err = cli("dequantize", folder, tmp_path / "dense", "--dtype", "float32")
    assert code == 0, err
    ours, source = load_tensors(tmp_path / "dense"), load_tensors(llama)
    stored = load_tensors(folder)
    modules = sorted(n.rsplit(".", 1)[0] for n in stored if n.endswith(".weight_scale"))
    assert len(modules) == (12 if method in NARROW else 14)
    for module in modules:
        theirs = library_decompress(folder, module).float()
        mine = ours[f"{module}.weight"]
        assert torch.equal(mine.view(torch.int32), theirs.view(torch.int32)), module
        reference = source[f"{module}.weight"].float()
        assert float((mine - reference).norm() / reference.norm()) < BOUND[method], module
    for module in narrow if method in NARROW else []:
        assert torch.equal(stored[f"{module}.weight"], source[f"{module}.weight"])


@pytest.mark.parametrize("method", ["fp8", "w4a16-asym", "nvfp4a16"])
def test_transformers_loads_our_output_and_runs(quantized, tmp_path, cli, method):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    folder, _ = quantized(method)
    assert cli("dequantize", folder, tmp_path / "dense")[0] == 0
    # run_compressed=False: transformers decompresses on load (its compressed kernels need a GPU)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", quantization_config=CompressedTensorsConfig(run_compressed=False))
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map="cpu")
    weights = dict(model.named_parameters())
    # transformers decompresses to the weights our dequantize writes
    checked = [name for name, param in dense.named_parameters() if name.endswith("proj.weight")]
    for name in checked:
        assert torch.equal(weights[name].float(), dict(dense.named_parameters())[name].float()), name
    assert len(checked) == 14
    ids = torch.tensor([[1, 5, 9, 200, 33]])
    with torch.no_grad():
        logits, expected = model(ids).logits.float(), dense(ids).logits.float()
    assert torch.isfinite(logits).all() and torch.allclose(logits, expected, rtol=0, atol=1e-2 * float(expected.abs().max()))


@pytest.mark.parametrize("method", ["fp8", "w4a16", "mxfp4a16"])
def test_inspect_and_verify_read_our_output(quantized, llama, cli, method):
    folder, _ = quantized(method)
    code, out, _ = cli("inspect", folder, "--json")
    data = json.loads(out)
    assert code == 0 and data["quantization"]["method"] == "compressed-tensors"
    assert data["num_parameters"] == json.loads(cli("inspect", llama, "--json")[1])["num_parameters"]
    code, out, err = cli("verify", folder, "--reference", llama, "--json")
    report = json.loads(out)
    assert code == 0, [c for c in report["checks"] if not c["ok"]]
    assert {c["name"] for c in report["checks"]} >= {"quantization", "size", "reference"} and report["layers"]


def test_verify_finds_a_missing_scale(quantized, tmp_path, cli):
    import shutil

    from safetensors.torch import save_file

    folder, _ = quantized("w4a16")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    tensors = load_tensors(broken)
    del tensors["model.layers.0.self_attn.q_proj.weight_shape"]
    for f in broken.glob("*.safetensors*"):
        f.unlink()
    save_file(tensors, broken / "model.safetensors")
    code, out, _ = cli("verify", broken, "--json")
    assert code == 1 and "weight_shape" in json.dumps(json.loads(out)["checks"])


@pytest.mark.parametrize("method,suffix", [("fp8", "weight_scale"), ("fp8-block", "weight_scale"), ("w4a16", "weight_scale"),
                                           ("w4a16-asym", "weight_zero_point"), ("nvfp4a16", "weight_scale")])  # fmt: skip
def test_dequantize_refuses_a_scale_that_does_not_fit(quantized, tmp_path, cli, method, suffix):
    import shutil

    from safetensors.torch import save_file

    folder, _ = quantized(method)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    tensors = load_tensors(broken)
    name = f"model.layers.0.self_attn.q_proj.{suffix}"
    tensors[name] = tensors[name][:-1].contiguous()
    for f in broken.glob("*.safetensors*"):
        f.unlink()
    save_file(tensors, broken / "model.safetensors")
    code, _, err = cli("dequantize", broken, tmp_path / "dense")
    assert code == 2 and "model.layers.0.self_attn.q_proj" in err and f"{suffix} holds" in err and "Traceback" not in err
    assert not (tmp_path / "dense").exists()


def test_group_size(llama, tmp_path, cli):
    code, _, err = cli("quantize", llama, tmp_path / "g64", "--method", "w4a16", "--group-size", "64")
    assert code == 0 and "kept dense" not in err, err  # 320 is a multiple of 64
    qc = json.loads((tmp_path / "g64" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["W4A16"]["weights"]["group_size"] == 64 and qc["ignore"] == ["lm_head"]
    assert load_tensors(tmp_path / "g64")["model.layers.0.mlp.down_proj.weight_scale"].shape == (256, 5)
    code, _, err = cli("quantize", llama, tmp_path / "bad", "--method", "fp8", "--group-size", "64")
    assert code == 2 and "--group-size 64" in err


def test_fp8_codec_matches_torch():
    bf16 = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    values = torch.cat([bf16, torch.randn(1 << 16) * 300, torch.tensor([448.0, 464.0, 480.0, 2.0**-10, -(2.0**-10)])])
    theirs = values.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    mine = fp8_e4m3_bits(values.numpy())
    finite = ~np.isnan(values.numpy())
    assert np.array_equal(mine[finite], theirs[finite])
    codes = torch.arange(256, dtype=torch.uint8)
    decoded = codes.view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(FP8_E4M3_VALUES.view(np.uint32)[~np.isnan(decoded)], decoded.view(np.uint32)[~np.isnan(decoded)])


@pytest.mark.skipif(not native.AVAILABLE, reason="quantkit's C kernels are not built")
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_c_kernel_gives_the_reference_bytes(dtype):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((97, 333)) * np.exp(rng.standard_normal((97, 1)) * 6)).astype(np.float32)
    w[3] = 0
    w[5, :8] = [np.inf, -np.inf, 1e-30, -1e-30, 0.0, -0.0, 448.0, -1e38]
    with np.errstate(all="ignore"):
        stored = dtypes.from_float32(w, dtype)
        codes, scale = schemes.fp8_channel(dtypes.to_float32(stored, dtype), dtype)
    fast_codes, fast_scale = native.fp8_channel(stored, dtype)
    assert np.array_equal(fast_codes, codes) and np.array_equal(fast_scale.view(np.uint32), scale.view(np.uint32))


@pytest.mark.skipif(not native.AVAILABLE, reason="quantkit's C kernels are not built")
def test_c_kernel_avx2_rows_give_the_portable_bytes():
    """bfloat16 rows go through hand-written AVX2 (where the CPU has it): the same codes and scales as the
    portable loop and the numpy reference, on every bfloat16 bit pattern at many magnitudes of scale, with
    infinities, NaN, zeros of both signs, subnormals, and a width that leaves a tail of 32-value steps."""
    from quantkit.native import kernels

    rng = np.random.default_rng(5)
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    finite = every[(every & 0x7F80) != 0x7F80]
    rows = [rng.permutation(finite)[:1000] for _ in range(60)]
    for row, top in zip(rows, rng.integers(0x0080, 0x7F00, len(rows))):  # peaks from tiny to huge
        row[:] = np.where((row & 0x7FFF) > top, row & 0x8000 | top, row)
    rows[0][:4] = [0x7F80, 0xFF80, 0x0000, 0x8000]  # +-inf: a scale of inf
    rows[1][:3] = [0x7FC1, 0x0001, 0x8001]  # NaN in the row
    rows[2][:] = 0
    stored = np.stack(rows)[:, :997]
    with np.errstate(all="ignore"):
        codes, scale = schemes.fp8_channel(dtypes.to_float32(stored, "BF16"), "BF16")
    before = kernels.simd(False)
    try:
        portable = native.fp8_channel(stored, "BF16")
        kernels.simd(True)
        fast = native.fp8_channel(stored, "BF16")
    finally:
        kernels.simd(before)
    for found in (portable, fast):  # (a NaN scale's payload is not part of the contract)
        assert np.array_equal(found[0], codes) and np.array_equal(found[1], scale, equal_nan=True)
        assert np.array_equal(np.delete(found[1], 1).view(np.uint32), np.delete(scale, 1).view(np.uint32))
    assert np.array_equal(fast[0], portable[0]) and np.array_equal(fast[1].view(np.uint32), portable[1].view(np.uint32))


@pytest.mark.skipif(not native.BLOCK_AVAILABLE, reason="quantkit's C kernels are not built")
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("shape", [(300, 333), (256, 384), (97, 128), (1, 5), (129, 257)])
def test_c_block_kernel_gives_the_reference_bytes(dtype, shape):
    """FP8_BLOCK's 128 x 128 blocks, ragged at the bottom and right edges, against schemes.fp8_block."""
    rows, cols = shape
    rng = np.random.default_rng(rows * cols + len(dtype))
    w = (rng.standard_normal(shape) * np.exp(rng.standard_normal((rows, 1)) * (2 if dtype == "F16" else 6))).astype(np.float32)
    if rows > 128 and cols > 128:
        w[:128, 128:256] = 0  # an all-zero block: scale finfo(S).eps
        w[128:, :128] = rng.choice([2.0**-24, -(2.0**-24), 0.0, -0.0], (rows - 128, 128))  # tiny: a float16 scale rounds to 0
        w[:128, :128] *= np.float32(60000.0 if dtype == "F16" else 1e37) / np.abs(w[:128, :128]).max()  # huge
    w[0, :5] = [1e-30, -1e-30, 0.0, -0.0, -448.0][:cols]
    stored = dtypes.from_float32(w, dtype)
    with np.errstate(over="ignore"):
        codes, scale = schemes.fp8_block(dtypes.to_float32(stored, dtype), dtype)
    fast_codes, fast_scale = native.fp8_block(stored, dtype, schemes.FP8_BLOCK)
    assert fast_scale.shape == scale.shape and np.array_equal(fast_scale.view(np.uint32), scale.view(np.uint32))
    assert np.array_equal(fast_codes, codes)
    quantizer, scheme = CompressedTensors(), schemes.SCHEMES["fp8-block"]
    for special in (np.nan, np.inf, -np.inf):
        w[-1, -1] = special
        damaged = dtypes.from_float32(w, dtype)
        assert native.fp8_block(damaged, dtype, schemes.FP8_BLOCK) is None
        with np.errstate(all="ignore"):  # the quantizer takes the reference for such a chunk
            codes, scale = schemes.fp8_block(dtypes.to_float32(damaged, dtype), dtype)
            ours, companions = quantizer._chunk(scheme, damaged, dtype, 0, None)
        assert np.array_equal(ours, codes) and np.array_equal(companions["weight_scale"], scale, equal_nan=True)


@pytest.mark.skipif(not native.BLOCK_AVAILABLE, reason="quantkit's C kernels are not built")
def test_c_block_kernel_refuses_wrong_arguments():
    src, codes = np.zeros((130, 256), np.float32), np.zeros((130, 256), np.uint8)
    with pytest.raises(ValueError, match="scales"):
        native.kernels.ct_fp8_block(src, 2, 256, 128, 128, codes, np.zeros((1, 2), np.float32), 1)
    with pytest.raises(ValueError, match="codes"):
        native.kernels.ct_fp8_block(src, 2, 256, 128, 128, codes[1:], np.zeros((2, 2), np.float32), 1)
    with pytest.raises(ValueError, match="dtype"):
        native.kernels.ct_fp8_block(src, 3, 256, 128, 128, codes, np.zeros((2, 2), np.float32), 1)
    assert native.kernels.ct_fp8_block(src, 2, 256, 128, 128, codes, np.zeros((2, 2), np.float32), 1) is True


@pytest.mark.skipif(not native.INT_AVAILABLE, reason="quantkit's C kernels are not built")
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 32), (8, 128), (8, 8)])
def test_c_int_kernel_gives_the_reference_bytes(dtype, bits, group_size):
    rng = np.random.default_rng(bits + group_size)
    scale = np.exp(rng.standard_normal((97, 1)) * (2 if dtype == "F16" else 6))
    w = (rng.standard_normal((97, 512)) * scale).astype(np.float32)
    w[3] = 0
    w[5, :6] = [1e-30, -1e-30, 0.0, -0.0, 7.5, -8.0]
    stored = dtypes.from_float32(w, dtype)
    codes, scales = schemes.int_symmetric(dtypes.to_float32(stored, dtype), dtype, bits, group_size)
    packed, fast_scales = native.int_symmetric(stored, dtype, bits, group_size)
    assert np.array_equal(packed, schemes.pack_int32(codes, bits))
    assert np.array_equal(fast_scales.view(np.uint32), scales.view(np.uint32))
    w[7, 9] = np.nan
    assert native.int_symmetric(dtypes.from_float32(w, dtype), dtype, bits, group_size) is None


@pytest.mark.skipif(not native.ASYM_AVAILABLE, reason="quantkit's C kernels are not built")
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 64), (4, 8), (8, 32)])
def test_c_asymmetric_kernel_gives_the_reference_bytes(dtype, bits, group_size):
    rng = np.random.default_rng(bits * group_size)
    scale = np.exp(rng.standard_normal((97, 1)) * (2 if dtype == "F16" else 6))
    cols = 576 if 576 % group_size == 0 else 640
    w = (rng.standard_normal((97, cols)) * scale).astype(np.float32)
    w[3] = 0  # all-zero groups: scale eps, zero point 0 (the reference's NaN)
    w[4] = np.abs(w[4])  # no negative value: low is 0
    w[6] = -np.abs(w[6])  # no positive value: high is 0
    w[8, :group_size] = rng.choice([2.0**-24, -(2.0**-24), 0.0], group_size)  # tiny: a float16 scale rounds to 0
    w[9, :group_size] = np.float32(60000.0 if dtype == "F16" else 1e37) * rng.choice([1, -1], group_size)  # huge
    w[5, :6] = [1e-30, -1e-30, 0.0, -0.0, 7.5, -8.0]
    stored = dtypes.from_float32(w, dtype)
    with np.errstate(over="ignore"):
        codes, scales, zero = schemes.int_asymmetric(dtypes.to_float32(stored, dtype), dtype, bits, group_size)
    packed, fast_scales, fast_zero = native.int_asymmetric(stored, dtype, bits, group_size)
    assert np.array_equal(packed, schemes.pack_int32(codes, bits))
    assert np.array_equal(fast_scales.view(np.uint32), scales.view(np.uint32))
    assert fast_zero.dtype == zero.dtype and np.array_equal(fast_zero, zero)
    for special in (np.nan, np.inf, -np.inf):
        w[7, 9] = special
        assert native.int_asymmetric(dtypes.from_float32(w, dtype), dtype, bits, group_size) is None


@pytest.mark.skipif(not native.DENSE_AVAILABLE, reason="quantkit's C kernels are not built")
@pytest.mark.parametrize("method", ["w4a16", "w4a16-asym", "w8a16", "nvfp4a16", "mxfp4a16"])
@pytest.mark.parametrize("out", ["bfloat16", "float16"])
def test_dequantize_through_the_kernel_writes_the_reference_bytes(quantized, tmp_path, cli, monkeypatch, method, out):
    """The integer and fp4 modules go through ct_int_dense (counted), and give what the numpy reference gives."""
    folder, _ = quantized(method)
    calls = []
    kernel = native.int_dense
    monkeypatch.setattr(native, "int_dense", lambda *args, **kw: calls.append(1) or kernel(*args, **kw))
    code, _, err = cli("dequantize", folder, tmp_path / "c", "--dtype", out)
    assert code == 0, err
    assert len(calls) == (12 if method in NARROW else 14)
    monkeypatch.setattr(native, "DENSE_AVAILABLE", False)
    code, _, err = cli("dequantize", folder, tmp_path / "numpy", "--dtype", out)
    assert code == 0, err
    ours, reference = load_tensors(tmp_path / "c"), load_tensors(tmp_path / "numpy")
    assert sorted(ours) == sorted(reference) and all(torch.equal(ours[name], reference[name]) for name in ours)


@pytest.mark.skipif(not native.FP4_AVAILABLE, reason="quantkit's C kernels are not built")
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("method", ["nvfp4a16", "mxfp4a16"])
def test_c_fp4_kernel_gives_the_reference_bytes(dtype, method):
    rng = np.random.default_rng(len(dtype) + len(method))
    w = (rng.standard_normal((97, 576)) * np.exp(rng.standard_normal((97, 1)) * (2 if dtype == "F16" else 8))).astype(np.float32)
    w[3] = 0
    w[5, :10] = [1e-30, -1e-30, 0.0, -0.0, 6.0, -6.0, 0.25, -0.25, 0.75, -5.0]  # e2m1's ties
    w[6, :32] = 2.0**-24 * rng.choice([1, -1, 0], 32)  # tiny: float16 subnormals, scales that round to 0
    w[7, :32] = (60000.0 if dtype == "F16" else 3e38) * rng.choice([1, -1], 32)  # huge: scales that overflow
    w[8, :32], w[9, :32] = 2.0**-130, 2.0**-127 * 1.6  # float32 subnormals
    stored = dtypes.from_float32(w, dtype)
    values = dtypes.to_float32(stored, dtype)
    mx = method == "mxfp4a16"
    for global_scale in [None] if mx else [schemes.nvfp4_global_scale(schemes.global_absmax(values), dtype), np.float32(7.0),
                                           schemes.nvfp4_global_scale(1e-3, dtype)]:  # fmt: skip
        with np.errstate(all="ignore"):
            codes, scales = schemes.mxfp4(values, dtype) if mx else schemes.nvfp4(values, dtype, global_scale)
        packed, fast_scales = native.fp4(stored, dtype, mx, global_scale)
        assert np.array_equal(packed, codes) and np.array_equal(fast_scales, scales), global_scale
    assert native.global_absmax(stored, dtype) == schemes.global_absmax(values)
    for special in (np.nan, np.inf):
        w[7, 9] = special
        damaged = dtypes.from_float32(w, dtype)
        assert native.fp4(damaged, dtype, mx, np.float32(1.0)) is None
        peak, reference = native.global_absmax(damaged, dtype), schemes.global_absmax(dtypes.to_float32(damaged, dtype))
        assert np.array_equal(np.float32(peak), np.float32(reference), equal_nan=True), special


@pytest.mark.parametrize("method,flag", [("w4a16-asym", "ASYM_AVAILABLE"), ("nvfp4a16", "FP4_AVAILABLE"),
                                         ("mxfp4a16", "FP4_AVAILABLE"), ("fp8-block", "BLOCK_AVAILABLE")])  # fmt: skip
def test_quantize_without_the_kernel_writes_the_same_bytes(llama, quantized, tmp_path, cli, monkeypatch, method, flag):
    folder, _ = quantized(method)
    monkeypatch.setattr(native, flag, False)
    code, _, err = cli("quantize", llama, tmp_path / "numpy", "--method", method)
    assert code == 0, err
    ours, reference = load_tensors(folder), load_tensors(tmp_path / "numpy")
    assert sorted(ours) == sorted(reference) and all(torch.equal(ours[name], reference[name]) for name in ours)


@pytest.mark.skipif(not native.FP4_AVAILABLE, reason="quantkit's C kernels are not built")
@pytest.mark.parametrize("where", [0, 65535, 65536, 3 * 65536 + 4])
def test_c_global_absmax_finds_the_peak_in_any_slice(where):
    values = np.zeros(3 * 65536 + 5, np.float32)
    values[where] = -3.5
    assert native.global_absmax(dtypes.from_float32(values, "BF16"), "BF16") == 3.5
    values[where - 1] = np.nan
    assert np.isnan(native.global_absmax(values, "F32"))
