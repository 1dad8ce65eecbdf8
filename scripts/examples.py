"""make examples: the small releases the README's "FP8 and MXFP4 releases" commands run on, written into build/:

  build/qwen3-tiny     a random bf16 Qwen3 (hidden 320, intermediate 200: widths that are not multiples of 128)
  build/fp8-release    it as a fine-grained FP8 release (quant_method "fp8", as DeepSeek-V3/R1 and Qwen3-FP8 ship):
                       float8 e4m3 weights, float32 weight_scale_inv per 128 x 128 block, ragged edge blocks
  build/gpt-oss-tiny   a gpt-oss release (quant_method "mxfp4", experts as *_blocks / *_scales) at small widths,
                       config.json as openai's releases on the Hub spell it, a tokenizer beside it

The builders are the tests' own (tests/releases.py). Each folder is written beside its place and renamed into it
when complete, replacing an older one.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
sys.path.insert(0, str(ROOT))


def write(folder: Path, make: Callable[[Path], Path]) -> None:
    """`make(path)` writes a new folder at `path`; it replaces `folder` only once complete."""
    BUILD.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=BUILD))
    try:
        make(tmp / folder.name)
        if folder.exists():
            shutil.rmtree(folder)
        (tmp / folder.name).rename(folder)
    finally:
        shutil.rmtree(tmp)
    print(f"wrote {folder.relative_to(ROOT)}", flush=True)


def main() -> None:
    import torch

    from tests.releases import gpt_oss_mxfp4, hub_style, publisher_fp8, qwen3

    write(BUILD / "qwen3-tiny", lambda path: qwen3(path, 320, 200))
    write(BUILD / "fp8-release", lambda path: publisher_fp8(BUILD / "qwen3-tiny", path, torch.float32))
    # e8m0 codes 119..123: scales near 2**-6, weights of a trained model's spread
    write(BUILD / "gpt-oss-tiny", lambda path: hub_style(gpt_oss_mxfp4(path.parent / "saved", codes=(119, 124), every_code=False), path))


if __name__ == "__main__":
    main()
