"""llama.cpp's own tools as the reference for GGUF's quant types, file types and importance matrices,
built from the llama-cpp-python sdist by `scripts/install_clients.py` (build_llama_tools) into
.clients/llama.cpp-build; a missing build fails these tests.

- every quant type's bytes == libggml's `ggml_quantize_chunk` (what llama-quantize calls) on hard rows,
  and the importance-weighted ones == libggml's quantize_* with the same weights;
- for every file type: `quantkit convert --gguf-type T` writes the tensor types, tensor bytes and
  general.file_type that `llama-quantize` writes from our F32 GGUF of the same model, on a model whose
  width is a multiple of 256 and one whose width (576) is not;
- with `--imatrix` from a file `llama-imatrix` wrote (GGUF and legacy .dat): every file type whose quant
  types have a weighted path (weighted.py) as llama-quantize.
"""

import ctypes
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from quantkit.errors import QuantkitError
from quantkit.io.source import open_checkpoint
from quantkit.methods.gguf import convert as gc
from quantkit.methods.gguf import file as gf
from quantkit.methods.gguf import types as ggml
from quantkit.methods.gguf import weighted
from quantkit.methods.gguf.imatrix import read_imatrix
from tests.gguf_checkpoints import TEXT, make_checkpoint

pytestmark = pytest.mark.clients
BIN = Path(__file__).resolve().parents[2] / ".clients" / "llama.cpp-build" / "bin"
FILE_TYPES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS",
              "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"]


def tool(name: str) -> Path:
    path = BIN / name
    assert path.exists(), f"{path} is missing: run scripts/install_clients.py (make test-clients) to build it"
    return path


@pytest.fixture(scope="module")
def libggml():
    lib = ctypes.CDLL(str(tool("libggml-base.so")))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_void_p]
    return lib


def hard_rows(seed: int = 0) -> np.ndarray:
    """Rows of 1024: each 256 of another kind (scales over 24 decades, heavy tails, one sign, ties, sparse,
    zeros, constants, huge, infinities)."""
    rng = np.random.default_rng(seed)
    n = 64
    kinds = [
        lambda: rng.standard_normal((n, 256)) * 10.0 ** rng.uniform(-12, 12, (n, 1)),
        lambda: rng.standard_t(1.3, (n, 256)),
        lambda: np.abs(rng.standard_normal((n, 256))) + rng.uniform(0, 3, (n, 1)),
        lambda: -np.abs(rng.standard_normal((n, 256))),
        lambda: rng.integers(-8, 9, (n, 256)) * 0.5,
        lambda: rng.standard_normal((n, 256)) * (rng.random((n, 256)) < 0.03),
        lambda: np.zeros((n, 256)),
        lambda: np.full((n, 256), rng.standard_normal()),
        lambda: rng.standard_normal((n, 256)) * 1e30,
        lambda: np.where(rng.random((n, 256)) < 0.01, np.inf, rng.standard_normal((n, 256))),
        lambda: rng.standard_normal((n, 256)).astype(np.float16).astype(np.float64),
        lambda: rng.laplace(size=(n, 256)),
    ]
    with np.errstate(all="ignore"):
        return np.concatenate([k() for k in kinds]).astype(np.float32).reshape(-1, 1024)


def ggml_quantize(lib, x: np.ndarray, qtype: Q, importance: np.ndarray | None = None) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], ggml.row_bytes(qtype, x.shape[1])), dtype=np.uint8)
    weights = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)  # alive for the call
    pointer = None if weights is None else weights.ctypes.data
    assert lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], pointer) == out.size
    return out


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS], ids=lambda q: q.name)
def test_block_bytes_equal_libggml(libggml, qtype):
    x = hard_rows()
    theirs = ggml_quantize(libggml, x, qtype)
    with np.errstate(all="ignore"):
        assert ggml.quantize(x, qtype).tobytes() == theirs.tobytes()  # the compiled kernel (C; numba for IQ4)
        assert ggml.TYPES[qtype].reference(x).tobytes() == theirs.tobytes()
    print(f"{qtype.name}: {theirs.size // GGML_QUANT_SIZES[qtype][1]} blocks byte-identical to libggml")


@pytest.mark.parametrize("qtype", list(weighted.QUANTIZERS), ids=lambda q: q.name)
def test_weighted_bytes_equal_libggml(libggml, qtype):
    x = hard_rows(1)
    rng = np.random.default_rng(2)
    for importance in (rng.random(1024) * 10.0 ** rng.uniform(-3, 3, 1024), np.where(np.arange(1024) % 7, 0.0, 1.0)):
        theirs = ggml_quantize(libggml, x, qtype, importance)
        with np.errstate(all="ignore"):
            assert weighted.QUANTIZERS[qtype](x, importance.astype(np.float32)).tobytes() == theirs.tobytes()


# ------------------------------------------------------------------------------------------ whole files


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two 4-layer llamas: width 256 with 8 heads over 2 KV heads (n_gqa 4 switches rules on), and width
    576 with 9 over 3 (SmolLM's shape: its rows do not hold 256-blocks). Each with its F32 GGUF by quantkit."""
    root = tmp_path_factory.mktemp("models")
    found = {}
    for name, shape in {"w256": dict(hidden=256, ffn=768, heads=8, kv_heads=2),
                        "w576": dict(hidden=576, ffn=1536, heads=9, kv_heads=3)}.items():
        src = make_checkpoint(root / name, "llama", layers=4, vocab=320, seed=5, **shape)
        gc.to_gguf(open_checkpoint(src), root / f"{name}-f32.gguf", "F32")
        found[name] = (src, root / f"{name}-f32.gguf")
    return found


def llama_quantize(f32: Path, out: Path, file_type: str, *extra: str) -> str:
    run = subprocess.run([str(tool("llama-quantize")), *extra, str(f32), str(out), file_type, "2"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return run.stdout + run.stderr


def assert_like_llama_quantize(src: Path, f32: Path, folder: Path, file_type: str) -> tuple[dict[str, Q], int]:
    """Our `file_type` GGUF of a checkpoint against llama-quantize's of our F32 GGUF of it: the same tensors,
    types and bytes, and as many fallbacks. Returns each tensor's type and the fallback count."""
    log = llama_quantize(f32, folder / "theirs.gguf", file_type)
    report = gc.to_gguf(open_checkpoint(src), folder / "ours.gguf", file_type)
    types = assert_same_file(folder / "ours.gguf", folder / "theirs.gguf")
    assert len(report.fallbacks) == log.count("falling back to")
    return types, len(report.fallbacks)


def assert_same_file(ours: Path, theirs: Path) -> dict[str, Q]:
    a, b = gf.read_gguf(ours), gf.read_gguf(theirs)
    ours_by_name, theirs_by_name = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ours_by_name.keys() == theirs_by_name.keys()
    wrong_type = {n: (t.qtype.name, theirs_by_name[n].qtype.name) for n, t in ours_by_name.items()
                  if t.qtype != theirs_by_name[n].qtype}
    assert not wrong_type, wrong_type
    for name, t in ours_by_name.items():
        assert a.rows(t).tobytes() == b.rows(theirs_by_name[name]).tobytes(), name
    assert a.metadata["general.file_type"] == b.metadata["general.file_type"]
    return {n: t.qtype for n, t in ours_by_name.items()}


@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("model", ["w256", "w576"])
def test_file_types_equal_llama_quantize(models, tmp_path, model, file_type):
    types, fallbacks = assert_like_llama_quantize(*models[model], tmp_path, file_type)
    print(f"{model} {file_type}: {len(types)} tensors equal ({', '.join(sorted({q.name for q in types.values()}))}), "
          f"{fallbacks} fallbacks")


def llama_imatrix(f32: Path, out: Path, fmt: str = "gguf") -> Path:
    """`out`: the importance matrix llama-imatrix computes on a GGUF over tests' calibration text (8 chunks of 64)."""
    calibration = out.parent / "calibration.txt"
    calibration.write_text(TEXT * 3)
    run = subprocess.run([str(tool("llama-imatrix")), "-m", str(f32), "-f", str(calibration), "-o", str(out), "-c", "64",
                          "-b", "64", "--chunks", "8", "-t", "2", "--output-format", fmt], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def imatrices(models, tmp_path_factory):
    """(model, format) -> an importance matrix llama-imatrix computed on our F32 GGUF."""
    root = tmp_path_factory.mktemp("imatrix")
    return {(model, fmt): llama_imatrix(models[model][1], root / f"{model}.{'gguf' if fmt == 'gguf' else 'dat'}", fmt)
            for model, fmt in (("w256", "gguf"), ("w256", "dat"), ("w576", "gguf"))}


# every file type whose quant types take importance weights (Q2_K_S: llama-quantize wants an imatrix for it)
IMATRIX_FILE_TYPES = ["Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
                      "IQ4_NL", "IQ4_XS", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


@pytest.mark.parametrize("model, fmt, file_type", [("w256", "dat", "Q4_K_M")] + [
    (model, "gguf", file_type) for model in ("w256", "w576") for file_type in IMATRIX_FILE_TYPES])
def test_imatrix_file_types_equal_llama_quantize(models, imatrices, tmp_path, model, fmt, file_type):
    src, f32 = models[model]
    imatrix = imatrices[model, fmt]
    assert len(read_imatrix(imatrix).weights) >= 4 * 7  # every linear weight of the 4 layers
    llama_quantize(f32, tmp_path / "theirs.gguf", file_type, "--imatrix", str(imatrix))
    gc.to_gguf(open_checkpoint(src), tmp_path / "ours.gguf", file_type, imatrix=read_imatrix(imatrix))
    types = assert_same_file(tmp_path / "ours.gguf", tmp_path / "theirs.gguf")
    print(f"{model} {file_type} --imatrix: {len(types)} tensors equal "
          f"({', '.join(sorted({q.name for q in types.values()}))})")
    if file_type == "Q2_K_S":  # llama-quantize makes it only with an imatrix, and so does quantkit
        with pytest.raises(QuantkitError, match="would be Q2_K in a Q2_K_S file"):
            gc.to_gguf(open_checkpoint(src), tmp_path / "plain.gguf", file_type)
        return
    # and the weights made a difference: without them the layers' weighted tensors' bytes differ
    gc.to_gguf(open_checkpoint(src), tmp_path / "plain.gguf", file_type)
    plain, ours = gf.read_gguf(tmp_path / "plain.gguf"), gf.read_gguf(tmp_path / "ours.gguf")
    plain_by_name = {t.name: t for t in plain.tensors}
    weighted_tensors = [t for t in ours.tensors if t.name.startswith("blk.") and ggml.TYPES[t.qtype].weighted is not None]
    assert weighted_tensors
    for t in weighted_tensors:
        assert plain.rows(plain_by_name[t.name]).tobytes() != ours.rows(t).tobytes(), t.name
