"""quantize --method gptq, convert --to gptq-v1|gptq-v2, dequantize / inspect / verify of GPTQ output,
checked with an unpacker written from the published layout (tests/formats/test_gptq.py), not quantkit's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.conftest import load_tensors
from tests.formats.test_gptq import spec_dequantize_gptq

GROUP = ["--group-size", "32"]


def arrays(folder) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in load_tensors(folder).items()}


def quantization_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", ["--sym", "--asym"])
def test_quantize_writes_the_gptq_layout(models, tmp_path, cli, bits, sym):
    code, _, err = cli("quantize", models["llama"], tmp_path / "q", "--method", "gptq", "--bits", bits, sym, *GROUP)
    assert code == 0, err
    qc = quantization_config(tmp_path / "q")
    version = "v1" if sym == "--sym" else "v2"  # asymmetric output defaults to v2
    assert qc["checkpoint_format"] == qc["format"] == {"v1": "gptq", "v2": "gptq_v2"}[version]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == ("gptq", bits, 32, False, sym == "--sym")
    ours, dense = arrays(tmp_path / "q"), arrays(models["llama"])
    assert "lm_head.weight" in ours and "model.layers.0.mlp.down_proj.weight" not in ours
    for module in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        parts = {p: ours[f"{module}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")}
        assert parts["qweight"].dtype == np.int32 and parts["g_idx"].dtype == np.int32
        parts["scales"] = parts["scales"].astype(np.float16)
        w = dense[f"{module}.weight"]
        error = np.abs(spec_dequantize_gptq(parts, bits, version) - w)
        step = np.repeat(parts["scales"].T.astype(np.float32), 32, axis=1)
        # round to nearest, but the integer zero point (and symmetric GPTQ's [-8, 7] steps) can leave
        # an end of the range up to one step outside the grid
        assert np.all(error <= step + 1e-6) and np.mean(error) < np.mean(step) / 2, module


def test_backends_and_runs_give_the_same_bytes(models, tmp_path, cli):
    for run, backend in (("a", "numba"), ("b", "numpy"), ("c", "numba")):
        code, _, err = cli("quantize", models["llama"], tmp_path / run, "--method", "gptq", "--asym", "--optimize",
                           "--backend", backend, *GROUP)  # fmt: skip
        assert code == 0, err
    data = [(tmp_path / run / "model.safetensors").read_bytes() for run in "abc"]
    assert data[0] == data[1] == data[2]


def test_convert_round_trip_is_byte_identical(models, tmp_path, cli):
    cli("quantize", models["llama"], tmp_path / "v1", "--method", "gptq", "--asym", "--format", "v1", *GROUP)
    assert cli("convert", tmp_path / "v1", tmp_path / "v2", "--to", "gptq-v2")[0] == 0
    assert cli("convert", tmp_path / "v2", tmp_path / "back", "--to", "gptq-v1")[0] == 0
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (tmp_path / "v1" / "model.safetensors").read_bytes()
    assert quantization_config(tmp_path / "back") == quantization_config(tmp_path / "v1")
    v1, v2 = arrays(tmp_path / "v1"), arrays(tmp_path / "v2")
    assert quantization_config(tmp_path / "v2")["checkpoint_format"] == quantization_config(tmp_path / "v2")["format"] == "gptq_v2"
    for name in v1:
        if name.endswith(".qzeros"):
            assert not np.array_equal(v1[name], v2[name])
        else:
            assert np.array_equal(v1[name], v2[name]), name
    for version, arrays_ in (("v1", v1), ("v2", v2)):
        m = "model.layers.0.mlp.up_proj"
        parts = {p: arrays_[f"{m}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")}
        assert np.array_equal(spec_dequantize_gptq(parts, 4, version), spec_dequantize_gptq(
            {p: v1[f"{m}.{p}"] for p in parts}, 4, "v1"))  # fmt: skip


def test_v2_zero_point_zero_is_refused_for_v1(models, tmp_path, cli):
    from safetensors.numpy import save_file

    from quantkit.methods.gptq.layout import pack_columns, unpack_columns

    cli("quantize", models["llama"], tmp_path / "v2", "--method", "gptq", "--asym", *GROUP)
    tensors = arrays(tmp_path / "v2")
    name = "model.layers.1.self_attn.o_proj.qzeros"
    zeros = unpack_columns(tensors[name], 4)
    zeros[0, 5] = 0  # a group whose weights are all >= 0 gets zero point 0 in v2
    tensors[name] = pack_columns(zeros, 4)
    save_file(tensors, str(tmp_path / "v2" / "model.safetensors"))
    code, _, err = cli("convert", tmp_path / "v2", tmp_path / "v1", "--to", "gptq-v1")
    assert code == 2 and "model.layers.1.self_attn.o_proj: a zero point is 0" in err and not (tmp_path / "v1").exists()


def test_v1_asymmetric_has_no_zero_point_zero(models, tmp_path, cli):
    cli("quantize", models["llama"], tmp_path / "v1", "--method", "gptq", "--asym", "--format", "v1", *GROUP)
    from quantkit.methods.gptq.layout import unpack_columns

    for name, value in arrays(tmp_path / "v1").items():
        if name.endswith(".qzeros"):
            assert (unpack_columns(value, 4) + 1).min() >= 1 and unpack_columns(value, 4).max() <= 14, name


def test_dequantize_restores_names_and_shapes(models, tmp_path, cli):
    cli("quantize", models["gpt2"], tmp_path / "q", "--method", "gptq", "--bits", "8", "--group-size", "16")
    code, _, err = cli("dequantize", tmp_path / "q", tmp_path / "d", "--dtype", "float32")
    assert code == 0, err
    dense, back = arrays(models["gpt2"]), arrays(tmp_path / "d")
    assert sorted(back) == sorted(k for k in dense if not k.endswith("attn.masked_bias") and not k.endswith(".attn.bias"))
    for name, value in back.items():
        assert value.shape == dense[name].shape, name
    w = dense["transformer.h.0.attn.c_attn.weight"]  # Conv1D, stored [in, out]
    assert np.abs(back["transformer.h.0.attn.c_attn.weight"] - w).max() < np.abs(w).max() / 100


def dequantize_both_ways(quantized, tmp_path, cli, monkeypatch, chunk_elements: int, dtype: str) -> list[tuple[int, int]]:
    """Dequantize through the C kernel (`chunk_elements` a chunk) and through the numpy reference (the path taken
    without the extension); assert the files are byte for byte the same; return the (first row, rows) of each
    kernel call."""
    from quantkit.methods.gptq import native, reader

    if not native.DENSE_AVAILABLE:
        pytest.fail("the C extension is not built")
    chunks = []
    monkeypatch.setattr(reader, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(native, "dense_rows", lambda *args, kernel=native.dense_rows: chunks.append(args[3:5]) or kernel(*args))
    code, _, err = cli("dequantize", quantized, tmp_path / f"c-{dtype}", "--dtype", dtype)
    assert code == 0, err
    monkeypatch.setattr(native, "DENSE_AVAILABLE", False)
    code, _, err = cli("dequantize", quantized, tmp_path / f"numpy-{dtype}", "--dtype", dtype)
    assert code == 0, err
    monkeypatch.undo()
    files = sorted(p.name for p in (tmp_path / f"numpy-{dtype}").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (tmp_path / f"c-{dtype}").glob("*.safetensors"))
    for file in files:
        assert (tmp_path / f"c-{dtype}" / file).read_bytes() == (tmp_path / f"numpy-{dtype}" / file).read_bytes(), file
    return chunks


@pytest.mark.parametrize("flags", [["--bits", "4", "--asym"], ["--bits", "2", "--sym", "--format", "v1"], ["--bits", "8", "--group-size", "-1"]])
def test_dequantize_kernel_writes_the_numpy_bytes(models, tmp_path, cli, monkeypatch, flags):
    """dequantize streams rows through the C kernel (here 3 rows and a bit a chunk, so chunks end anywhere):
    every dtype's file is byte for byte the numpy reference's."""
    group = [] if "--group-size" in flags else GROUP
    assert cli("quantize", models["llama"], tmp_path / "q", "--method", "gptq", *flags, *group)[0] == 0
    for dtype in ("bfloat16", "float32", "float16"):
        chunks = dequantize_both_ways(tmp_path / "q", tmp_path, cli, monkeypatch, 3 * 64 + 5, dtype)
        assert (0, 3) in chunks and (63, 1) in chunks and (159, 1) in chunks  # the kernel wrote every module, in short chunks
        assert load_tensors(tmp_path / f"c-{dtype}")["model.layers.0.mlp.down_proj.weight"].shape == (64, 160)


@pytest.mark.parametrize("flags", [["--bits", "4", "--asym"], ["--bits", "8", "--sym", "--format", "v1"]])
def test_dequantize_conv1d_kernel_writes_the_numpy_bytes(models, tmp_path, cli, monkeypatch, flags):
    """GPT-2's Conv1D modules (stored [in, out]) go through the C kernel too, each whole, and are written
    transposed in short chunks: every dtype's file byte for byte the numpy reference's."""
    assert cli("quantize", models["gpt2"], tmp_path / "q", "--method", "gptq", *flags, "--group-size", "16")[0] == 0
    for dtype in ("bfloat16", "float32", "float16"):
        chunks = dequantize_both_ways(tmp_path / "q", tmp_path, cli, monkeypatch, 3 * 144 + 5, dtype)
        assert chunks.count((0, 144)) == 2 and chunks.count((0, 192)) == 2, chunks  # c_attn and c_fc of both layers, whole
        assert load_tensors(tmp_path / f"c-{dtype}")["transformer.h.0.attn.c_attn.weight"].shape == (48, 144)


def test_dequantize_awq_kernel_writes_the_numpy_bytes(models, tmp_path, cli, monkeypatch):
    """An AWQ GEMM checkpoint (quantkit's GPTQ v2 modules repacked as AWQ) dequantizes through the C kernel,
    in short chunks, to the numpy reference's files, every dtype."""
    from safetensors.torch import load_file

    from quantkit.methods.gptq import native, reader
    from tests.test_hostile_round2 import _as_awq, _rewrite

    if not native.DENSE_AVAILABLE:
        pytest.fail("the C extension is not built")
    assert cli("quantize", models["llama"], tmp_path / "q", "--method", "gptq", "--asym", "--format", "v2", *GROUP)[0] == 0
    tensors, qc = _as_awq(load_file(str(tmp_path / "q" / "model.safetensors")), 32)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    awq = _rewrite(tmp_path / "q", tmp_path / "awq", tensors, {**config, "quantization_config": qc})
    for dtype in ("bfloat16", "float32", "float16"):
        chunks = []
        monkeypatch.setattr(reader, "CHUNK_ELEMENTS", 2 * 64 + 1)
        monkeypatch.setattr(native, "dense_rows", lambda *args, seen=chunks, kernel=native.dense_rows: seen.append(args[3:5]) or kernel(*args))
        assert cli("dequantize", awq, tmp_path / f"c-{dtype}", "--dtype", dtype)[0] == 0
        assert (0, 2) in chunks and (158, 2) in chunks and (63, 1) in chunks  # 2 rows a chunk of 64 inputs, 1 of 160
        monkeypatch.setattr(native, "DENSE_AVAILABLE", False)
        assert cli("dequantize", awq, tmp_path / f"numpy-{dtype}", "--dtype", dtype)[0] == 0
        monkeypatch.undo()
        data = [(tmp_path / f"{path}-{dtype}" / "model.safetensors").read_bytes() for path in ("c", "numpy")]
        assert data[0] == data[1], dtype


def test_inspect_and_verify(models, tmp_path, cli):
    cli("quantize", models["llama"], tmp_path / "q", "--method", "gptq", "--asym", *GROUP)
    code, out, _ = cli("inspect", tmp_path / "q", "--json")
    info = json.loads(out)["quantization"]
    assert (info["method"], info["bits"], info["group_size"], info["sym"], info["format"]) == ("gptq", 4, 32, False, "v2")
    code, out, _ = cli("verify", tmp_path / "q", "--reference", models["llama"], "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and len(report["layers"]) == 14, report


def test_verify_fails_a_declared_format_that_disagrees(models, tmp_path, cli):
    cli("quantize", models["llama"], tmp_path / "q", "--method", "gptq", "--sym", "--format", "v2", *GROUP)
    shutil.copytree(tmp_path / "q", tmp_path / "lying")
    config = json.loads((tmp_path / "lying" / "config.json").read_text())
    config["quantization_config"].update(checkpoint_format="gptq", format="gptq")
    (tmp_path / "lying" / "config.json").write_text(json.dumps(config))
    code, out, _ = cli("verify", tmp_path / "lying", "--json")
    failed = [c for c in json.loads(out)["checks"] if not c["ok"]]
    assert code == 1 and failed[0]["name"] == "quantization" and "stored as GPTQ v2" in failed[0]["detail"]


def test_verify_fails_a_missing_companion(models, tmp_path, cli):
    from safetensors.numpy import save_file

    cli("quantize", models["llama"], tmp_path / "q", "--method", "gptq", *GROUP)
    tensors = {k: v for k, v in arrays(tmp_path / "q").items() if k != "model.layers.1.mlp.up_proj.g_idx"}
    tensors = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "q" / "model.safetensors"))
    code, out, _ = cli("verify", tmp_path / "q", "--json")
    assert code == 1 and "model.layers.1.mlp.up_proj': missing g_idx" in out


@pytest.mark.parametrize(
    "flags,message",
    [(["--group-size", "128"], "model.layers.0.mlp.down_proj.weight: 160 input features are not a multiple of group size 128"),
     (["--bits", "3"], "'--bits': '3' is not one of '2', '4', '8'"), (["--format", "v3"], "'--format': 'v3' is not one of 'v1', 'v2'"), (["--backend", "torch"], "--backend torch")],
)  # fmt: skip
def test_bad_settings_are_refused_before_writing(models, tmp_path, cli, flags, message):
    code, _, err = cli("quantize", models["llama"], tmp_path / "q", "--method", "gptq", *flags)
    assert code == 2 and message in err and not (tmp_path / "q").exists()


def test_skipped_modules_are_listed_for_the_loader(models, tmp_path, cli):
    code, _, err = cli("quantize", models["llama"], tmp_path / "q", "--method", "gptq", "--skip", "*.down_proj", *GROUP)
    assert code == 0, err
    qc = quantization_config(tmp_path / "q")
    assert qc["dynamic"] == {r"-:^model\.layers\.0\.mlp\.down_proj$": {}, r"-:^model\.layers\.1\.mlp\.down_proj$": {}}
    assert "model.layers.0.mlp.down_proj.weight" in arrays(tmp_path / "q")
