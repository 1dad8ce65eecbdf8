"""make test-clients: install the real third-party clients the `clients` tests drive.

- llama-cpp-python into .venv (builds llama.cpp from source: a few minutes on 2 cores);
- GPTQModel 7.7.0 in a venv of its own, .venv-gptq (its requirements ask for a newer torch, which would
  pull CUDA wheels, so torch 2.13.0 goes in first and gptqmodel itself without dependencies).
- llm-compressor 0.14.0.1 (with compressed-tensors 0.19.0) in a venv of its own, .venv-llmc (torch 2.13.0
  first, so that it does not pull CUDA wheels).
Each step is skipped when its client already imports.
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
    print("$ pip install llama-cpp-python==0.3.36  (builds llama.cpp from source)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "llama-cpp-python==0.3.36"], check=True, env=env)


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
    install_gptqmodel()
    install_llmcompressor()
