"""make test-clients: install the real third-party clients the `clients` tests drive.

- llama-cpp-python into .venv (builds llama.cpp from source: a few minutes on 2 cores);
- llama.cpp's tools (llama-quantize, llama-imatrix, llama-perplexity) built with CMake from the llama.cpp
  sources the llama-cpp-python 0.3.36 sdist vendors, into .clients/llama.cpp-build (the sources stay in
  .clients/, with convert_hf_to_gguf.py, which the bench runs, and models/ggml-vocab-*.gguf, the real
  vocabularies tests/clients/test_gguf_vocabs.py converts);
- GPTQModel 7.7.0 in a venv of its own, .venv-gptq (its requirements ask for a newer torch, which would
  pull CUDA wheels, so torch 2.13.0 goes in first and gptqmodel itself without dependencies).
- llm-compressor 0.14.0.1 (with compressed-tensors 0.19.0) in a venv of its own, .venv-llmc (torch 2.13.0
  first, so that it does not pull CUDA wheels).
Each step is skipped when its client already imports or its programs exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPTQ_VENV = ROOT / ".venv-gptq"
LLMC_VENV = ROOT / ".venv-llmc"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CLIENTS = ROOT / ".clients"
LLAMA_CPP_SOURCE = CLIENTS / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
LLAMA_CPP_BUILD = CLIENTS / "llama.cpp-build"
LLAMA_TOOLS = ["llama-quantize", "llama-imatrix", "llama-perplexity"]


def run(*argv: str) -> None:
    print("$ " + " ".join(argv), flush=True)
    subprocess.run(argv, check=True)


def imports(python: Path | str, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


def install_llama_cpp() -> None:
    if imports(sys.executable, "llama_cpp"):
        return
    # Portable build (no -march=native: its fused multiply-adds could change the reference quantizers'
    # bytes), without the multimodal library the tests do not use.
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    print(f"$ pip install {LLAMA_CPP_PYTHON}  (builds llama.cpp from source)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", LLAMA_CPP_PYTHON], check=True, env=env)


def build_llama_tools(targets: list[str] = LLAMA_TOOLS) -> None:
    """llama.cpp's command-line tools from the sdist's sources. Portable (GGML_NATIVE off: no fused
    multiply-add, so the reference quantizers' bytes are the scalar C's), shared libraries, only the
    targets asked for (all tools would add the server and hours on 2 cores)."""
    if all((LLAMA_CPP_BUILD / "bin" / target).exists() for target in targets):
        return
    if not LLAMA_CPP_SOURCE.exists():
        CLIENTS.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            run(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_PYTHON, "-d", tmp)
            with tarfile.open(next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))) as sdist:
                sdist.extractall(CLIENTS, filter="data")
    run("cmake", "-S", str(LLAMA_CPP_SOURCE), "-B", str(LLAMA_CPP_BUILD), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF",
        "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF")
    run("cmake", "--build", str(LLAMA_CPP_BUILD), "--config", "Release", "-j", str(os.cpu_count() or 2), "--target", *targets)


def venv_with_torch(venv: Path, module: str) -> list[str] | None:
    """A venv holding torch 2.13.0 (CPU) and the pip command line into it; None when `module` imports there."""
    python = venv / "bin" / "python"
    if python.exists() and imports(python, module):
        return None
    run(sys.executable, "-m", "venv", str(venv))
    pip = [str(python), "-m", "pip", "install", "-q"]
    run(*pip, "torch==2.13.0")
    return pip


def install_gptqmodel() -> None:
    pip = venv_with_torch(GPTQ_VENV, "gptqmodel")
    if pip is None:
        return
    python = pip[0]
    run(*pip, "transformers", "accelerate", "optimum")
    with tempfile.TemporaryDirectory() as tmp:
        run(python, "-m", "pip", "download", "-q", "gptqmodel==7.7.0", "--no-deps", "--no-binary", ":all:", "-d", tmp)
        with tarfile.open(next(Path(tmp).glob("gptqmodel-*.tar.gz"))) as sdist:
            member = next(m for m in sdist.getmembers() if m.name.endswith("/requirements.txt") and m.name.count("/") == 1)
            requirements = sdist.extractfile(member).read().decode()
        wanted = [line for line in requirements.splitlines() if line.strip() and not re.match(r"^\s*torch\b", line, re.I)]
        (Path(tmp) / "req.txt").write_text("\n".join(wanted) + "\n")
        run(*pip, "-r", str(Path(tmp) / "req.txt"))
    run(*pip, "--no-deps", "gptqmodel==7.7.0")


def install_llmcompressor() -> None:
    pip = venv_with_torch(LLMC_VENV, "llmcompressor")
    if pip is not None:
        run(*pip, "llmcompressor==0.14.0.1")


if __name__ == "__main__":
    install_llama_cpp()
    build_llama_tools()
    install_gptqmodel()
    install_llmcompressor()
