"""GPTQModel, the GPTQ loader transformers uses, against quantkit: it loads what we write, and what it
writes (GPTQ v1 / v2 with act-order, AWQ GEMM) we read back to the weights its own modules use.

GPTQModel lives in its own venv (.venv-gptq, see Makefile `test-clients`); it runs in a subprocess
through gptqmodel_worker.py, so this file itself needs only quantkit's test environment.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import load_tensors

pytestmark = pytest.mark.clients

ROOT = Path(__file__).resolve().parents[2]
GPTQ_PYTHON = ROOT / ".venv-gptq" / "bin" / "python"
WORKER = Path(__file__).with_name("gptqmodel_worker.py")

OURS = {
    "4bit-sym-v1": ["--bits", "4", "--sym"],
    "4bit-asym-v2-optimize": ["--bits", "4", "--asym", "--optimize"],
    "8bit-sym-v2": ["--bits", "8", "--sym", "--format", "v2"],
    "8bit-asym-v2": ["--bits", "8", "--asym"],
    "2bit-asym-v2-optimize": ["--bits", "2", "--asym", "--optimize"],
    "4bit-sym-v1-whole-rows": ["--bits", "4", "--sym", "--group-size", "-1"],
}
THEIRS = {  # name -> worker arguments after OUT
    "gptq-v1-4bit-sym-act": ["gptq", "4", "32", "sym", "act", "gptq"],
    "gptq-v1-4bit-asym-act": ["gptq", "4", "32", "asym", "act", "gptq"],
    "gptq-8bit-asym-act": ["gptq", "8", "32", "asym", "act", "gptq_v2"],
    "awq-4bit": ["awq", "4", "32"],
    # from a bf16 model: GPTQModel 7.7 writes the AWQ scales in BF16 (its GPTQ scales stay float16)
    "awq-4bit-bf16": ["awq", "4", "32", "bfloat16"],
    "gptq-v2-4bit-sym-bf16": ["gptq", "4", "32", "sym", "noact", "gptq_v2", "bfloat16"],
}


def worker(*args: object) -> None:
    if not GPTQ_PYTHON.exists():
        pytest.fail(f"{GPTQ_PYTHON} is missing: make test-clients installs GPTQModel there")
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1", "GPTQMODEL_CPU_WORKERS": "2"}
    command = [str(GPTQ_PYTHON), str(WORKER), *map(str, args)]
    run = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def gptqmodel_view(qdir: Path, loader: str = "gptqmodel") -> dict[str, dict[str, np.ndarray]]:
    """Per quantized module, what GPTQModel's torch kernel makes of `qdir`: weight, input, output."""
    npz = qdir.with_name(f"{qdir.name}-{loader}.npz")
    if not npz.exists():
        worker("load", qdir, npz, loader)
    modules: dict[str, dict[str, np.ndarray]] = {}
    with np.load(npz) as data:
        for key in data.files:
            module, what = key.rsplit("/", 1)
            modules.setdefault(module, {})[what] = data[key]
    return modules


def dense_weights(folder: Path) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in load_tensors(folder).items() if k.endswith(".weight")}


@pytest.fixture(scope="session")
def clients_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gptqmodel")


@pytest.fixture(scope="session")
def dense(clients_root) -> Path:
    folder = clients_root / "dense"
    worker("dense", folder)
    return folder


@pytest.fixture(scope="session")
def theirs(clients_root) -> dict[str, Path]:
    """Real third-party checkpoints: a tiny Llama quantized by GPTQModel itself (with calibration)."""
    made = {}
    for name, args in THEIRS.items():
        made[name] = clients_root / name
        worker("produce", made[name], *args)
    return made


@pytest.mark.parametrize("case", sorted(OURS))
def test_gptqmodel_loads_our_output(dense, clients_root, cli, case):
    out = clients_root / f"ours-{case}"
    flags = OURS[case] if "--group-size" in OURS[case] else [*OURS[case], "--group-size", "32"]
    code, _, err = cli("quantize", dense, out, "--method", "gptq", *flags)
    assert code == 0, err
    code, _, err = cli("dequantize", out, clients_root / f"ours-{case}-dense", "--dtype", "float32")
    assert code == 0, err
    ours = dense_weights(clients_root / f"ours-{case}-dense")
    source = dense_weights(dense)
    view = gptqmodel_view(out)
    assert len(view) == 7
    for module, seen in view.items():
        weight = ours[f"{module}.weight"]
        # GPTQModel computes scale * (q - zero) in float16: the same value, rounded once
        assert np.array_equal(seen["weight"], weight.astype(np.float16).astype(np.float32)), module
        expected = seen["input"] @ weight.T
        rel = np.linalg.norm(seen["output"] - expected) / np.linalg.norm(expected)
        assert rel < 2e-3, (module, rel)  # float16 matmul rounding only
        w = source[f"{module}.weight"]
        assert np.linalg.norm(weight - w) / np.linalg.norm(w) < {"2": 0.6, "4": 0.15, "8": 0.01}[case[0]], module


@pytest.mark.parametrize("name", sorted(THEIRS))
def test_dequantize_matches_their_modules(theirs, clients_root, cli, name):
    out = clients_root / f"{name}-dequantized"
    code, _, err = cli("dequantize", theirs[name], out, "--dtype", "float32")
    assert code == 0, err
    ours = dense_weights(out)
    for module, seen in gptqmodel_view(theirs[name]).items():
        assert np.array_equal(seen["weight"], ours[f"{module}.weight"].astype(np.float16).astype(np.float32)), module


@pytest.mark.parametrize("name", sorted(THEIRS))
def test_dequantize_kernel_gives_the_numpy_bytes_on_their_checkpoints(theirs, clients_root, cli, monkeypatch, name):
    """GPTQModel's own checkpoints (GPTQ with act-order g_idx, v1 and v2; AWQ GEMM; float16 and bf16 scales)
    through the C kernel give the files the numpy reference writes (the path taken without the extension),
    bf16 and float32 alike."""
    from quantkit.methods.gptq import native

    if not native.DENSE_AVAILABLE:
        pytest.fail("the C extension is not built")
    for dtype in ("bfloat16", "float32"):
        kernel, numpy = clients_root / f"{name}-{dtype}-kernel", clients_root / f"{name}-{dtype}-numpy"
        calls = []
        with monkeypatch.context() as patch:
            patch.setattr(native, "dense_rows", lambda *args, seen=calls, run=native.dense_rows: seen.append(args[3]) or run(*args))
            assert cli("dequantize", theirs[name], kernel, "--dtype", dtype)[0] == 0
        assert calls.count(0) == len(gptqmodel_view(theirs[name]))  # the kernel took every quantized module
        with monkeypatch.context() as patch:
            patch.setattr(native, "DENSE_AVAILABLE", False)
            assert cli("dequantize", theirs[name], numpy, "--dtype", dtype)[0] == 0
        files = sorted(p.name for p in numpy.glob("*.safetensors"))
        assert files and files == sorted(p.name for p in kernel.glob("*.safetensors"))
        for file in files:
            assert (kernel / file).read_bytes() == (numpy / file).read_bytes(), (dtype, file)


@pytest.mark.parametrize("name", sorted(THEIRS))
def test_verify_accepts_their_checkpoints(theirs, cli, name):
    reference = Path(f"{theirs[name]}-dense")
    code, out, _ = cli("verify", theirs[name], "--reference", reference, "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"], report


def test_convert_their_v1_to_v2_and_back(theirs, clients_root, cli):
    v1 = theirs["gptq-v1-4bit-asym-act"]
    v2, back = clients_root / "theirs-v2", clients_root / "theirs-v2-v1"
    assert cli("convert", v1, v2, "--to", "gptq-v2")[0] == 0
    assert cli("convert", v2, back, "--to", "gptq-v1")[0] == 0
    original, round_trip = load_tensors(v1), load_tensors(back)
    assert sorted(original) == sorted(round_trip)
    for key in original:
        assert original[key].dtype == round_trip[key].dtype and bool((original[key] == round_trip[key]).all()), key
    for path in (v2, back):
        declared = json.loads((path / "quantize_config.json").read_text())
        assert declared["checkpoint_format"] == json.loads((path / "config.json").read_text())["quantization_config"]["format"]
    before, after = gptqmodel_view(v1), gptqmodel_view(v2)
    for module in before:
        assert np.array_equal(before[module]["weight"], after[module]["weight"]), module
        assert np.array_equal(before[module]["output"], after[module]["output"]), module


def test_v1_asymmetric_loads_through_transformers_not_gptqmodel(dense, clients_root, cli):
    """GPTQModel.load refuses sym=false in v1 unless gptqmodel >= 0.9 wrote it (hence v2 by default);
    transformers' from_pretrained accepts it and reads the same weights."""
    out = clients_root / "ours-v1-asym"
    assert cli("quantize", dense, out, "--method", "gptq", "--asym", "--format", "v1", "--group-size", "32")[0] == 0
    assert cli("dequantize", out, clients_root / "ours-v1-asym-dense", "--dtype", "float32")[0] == 0
    ours = dense_weights(clients_root / "ours-v1-asym-dense")
    view = gptqmodel_view(out, "transformers")
    assert len(view) == 7
    for module, seen in view.items():
        assert np.array_equal(seen["weight"], ours[f"{module}.weight"].astype(np.float16).astype(np.float32)), module
    with pytest.raises(AssertionError, match="only supported if produced by gptqmodel"):
        gptqmodel_view(out)
