"""make test-clients: install the real third-party clients the `clients` tests drive.

- llama-cpp-python into .venv (builds llama.cpp from source: a few minutes on 2 cores);
- llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity) built with CMake from the
  same sources (the llama-cpp-python sdist) into .clients/llama.cpp-build/bin;
- GPTQModel 7.7.0 in a venv of its own, .venv-gptq (its requirements ask for a newer torch, which would
  pull CUDA wheels, so torch 2.13.0 goes in first and gptqmodel itself without dependencies).
Each step is skipped when its client already imports.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPTQ_VENV = ROOT / ".venv-gptq"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
LLAMA_BUILD = ROOT / ".clients" / "llama.cpp-build"  # the client tests look for the tools here
LLAMA_TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")


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


def build_llama_tools() -> None:
    """llama.cpp's tools from the sources vendored in the llama-cpp-python sdist (the version whose library
    the other client tests load): portable (no -march=native), shared libraries, no network features."""
    if all((LLAMA_BUILD / "bin" / tool).exists() for tool in LLAMA_TOOLS):
        return
    cmake = shutil.which("cmake")
    if cmake is None:
        run(sys.executable, "-m", "pip", "install", "-q", "cmake")
        cmake = str(Path(sys.executable).parent / "cmake")
    sources = ROOT / ".clients"
    sources.mkdir(exist_ok=True)
    vendored = next(sources.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if vendored is None:
        with tempfile.TemporaryDirectory() as tmp:
            run(sys.executable, "-m", "pip", "download", "-q", LLAMA_CPP_PYTHON, "--no-deps", "--no-binary", ":all:", "-d", tmp)
            with tarfile.open(next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))) as sdist:
                sdist.extractall(sources, filter="data")
        vendored = next(sources.glob("llama_cpp_python-*/vendor/llama.cpp"))
    run(cmake, "-S", str(vendored), "-B", str(LLAMA_BUILD), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF",
        "-DLLAMA_BUILD_TOOLS=ON", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF")
    run(cmake, "--build", str(LLAMA_BUILD), "--config", "Release", "-j", str(os.cpu_count() or 2), "--target", *LLAMA_TOOLS)


def install_gptqmodel() -> None:
    python = GPTQ_VENV / "bin" / "python"
    if python.exists() and imports(python, "gptqmodel"):
        return
    run(sys.executable, "-m", "venv", str(GPTQ_VENV))
    pip = [str(python), "-m", "pip", "install", "-q"]
    run(*pip, "torch==2.13.0")
    run(*pip, "transformers", "accelerate", "optimum")
    with tempfile.TemporaryDirectory() as tmp:
        run(str(python), "-m", "pip", "download", "-q", "gptqmodel==7.7.0", "--no-deps", "--no-binary", ":all:", "-d", tmp)
        with tarfile.open(next(Path(tmp).glob("gptqmodel-*.tar.gz"))) as sdist:
            member = next(m for m in sdist.getmembers() if m.name.endswith("/requirements.txt") and m.name.count("/") == 1)
            requirements = sdist.extractfile(member).read().decode()
        wanted = [line for line in requirements.splitlines() if line.strip() and not re.match(r"^\s*torch\b", line, re.I)]
        (Path(tmp) / "req.txt").write_text("\n".join(wanted) + "\n")
        run(*pip, "-r", str(Path(tmp) / "req.txt"))
    run(*pip, "--no-deps", "gptqmodel==7.7.0")


if __name__ == "__main__":
    install_llama_cpp()
    build_llama_tools()
    install_gptqmodel()
