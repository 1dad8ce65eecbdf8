"""llm-compressor's model_free_ptq (0.14.0.1, compressed-tensors 0.19.0) against quantkit: for every preset,
the same tensors byte for byte and the same quantization_config field for field, on a bf16 Llama whose
intermediate width (320) does not divide by 128.

llm-compressor stops with a traceback on modules its groups or blocks do not divide; quantkit keeps them
dense and lists them in `ignore`. So it is given our ignore list, plus the embeddings, which it would
quantize (a model-free tool cannot tell an embedding from a linear layer); loaders target Linear modules
only. It runs in .venv-llmc through llmcompressor_worker.py, as GPTQModel does in test_gptqmodel.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import load_tensors
from tests.test_quantize_ct import METHODS, llama, quantized  # noqa: F401 (fixtures)

pytestmark = pytest.mark.clients

ROOT = Path(__file__).resolve().parents[2]
LLMC_PYTHON = ROOT / ".venv-llmc" / "bin" / "python"
WORKER = Path(__file__).with_name("llmcompressor_worker.py")
EMBEDDINGS = "re:.*embed_tokens$"


def model_free_ptq(src: Path, out: Path, scheme: str, ignore: list[str]) -> None:
    assert LLMC_PYTHON.exists(), f"{LLMC_PYTHON} is missing: make test-clients installs llm-compressor there"
    run = subprocess.run([str(LLMC_PYTHON), str(WORKER), str(src), str(out), scheme, json.dumps(ignore)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.parametrize("method", METHODS)
def test_same_bytes_and_config_as_model_free_ptq(llama, quantized, tmp_path, method):  # noqa: F811
    from quantkit.methods.ct.schemes import SCHEMES

    ours_dir, _ = quantized(method)
    qc = json.loads((ours_dir / "config.json").read_text())["quantization_config"]
    model_free_ptq(llama, tmp_path / "llmc", SCHEMES[method].name, [*qc["ignore"], EMBEDDINGS])
    theirs_qc = json.loads((tmp_path / "llmc" / "config.json").read_text())["quantization_config"]
    assert theirs_qc["ignore"] == [*qc["ignore"], EMBEDDINGS]
    assert {**theirs_qc, "ignore": qc["ignore"]} == qc
    ours, theirs = load_tensors(ours_dir), load_tensors(tmp_path / "llmc")
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        a, b = ours[name], theirs[name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        assert a.reshape(-1).view(torch_uint8()).equal(b.reshape(-1).view(torch_uint8())), name


def torch_uint8():
    import torch

    return torch.uint8
