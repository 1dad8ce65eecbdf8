"""Runs inside the GPTQModel venv (.venv-gptq), driven by test_gptqmodel.py through a subprocess.

  dense OUT                                         a tiny float16 Llama with a tokenizer (loaders want one)
  produce OUT gptq BITS GROUP SYM DESC_ACT FORMAT [DTYPE]   a tiny Llama (float16, or DTYPE such as
                                                            bfloat16) quantized by GPTQModel itself
  produce OUT awq BITS GROUP [DTYPE]                        the same, AWQ GEMM
  load QDIR NPZ [transformers]                      load QDIR with GPTQModel's torch kernels (directly,
                                                    or through transformers' from_pretrained) and dump,
                                                    per quantized module, its own dequantized weight
                                                    and its output on a fixed input
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import numpy as np
import torch


def tiny_llama(folder: str, dtype: torch.dtype = torch.float16) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(320)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", pad_token="t1", eos_token="t2",
                            bos_token="t3").save_pretrained(folder)  # fmt: skip


def produce(out: str, method: str, bits: int, group_size: int, sym: bool = True, desc_act: bool = False,
            fmt: str = "gptq", dtype: str = "float16") -> None:  # fmt: skip
    """`dtype`: the source model's (GPTQModel writes AWQ scales in it: bf16 from a bf16 model)."""
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    dense = out + "-dense"
    tiny_llama(dense, getattr(torch, dtype))
    if method == "awq":
        config = QuantizeConfig(bits=bits, group_size=group_size, quant_method="awq", format="gemm", offload_to_disk=False)
        backend = BACKEND.AWQ_TORCH
    else:
        config = QuantizeConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, format=fmt,
                                offload_to_disk=False)  # fmt: skip
        backend = BACKEND.TORCH
    model = GPTQModel.load(dense, config, device="cpu", dtype=getattr(torch, dtype))
    generator = torch.Generator().manual_seed(0)
    calibration = [
        {"input_ids": torch.randint(4, 320, (1, 48), generator=generator), "attention_mask": torch.ones(1, 48, dtype=torch.long)}
        for _ in range(16)
    ]
    model.quantize(calibration, backend=backend)
    model.save(out)


def load(qdir: str, npz: str, loader: str = "gptqmodel") -> None:
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    with open(os.path.join(qdir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)["quantization_config"]
    method = config["quant_method"]
    if loader == "transformers":
        from transformers import AutoModelForCausalLM, GPTQConfig

        model = AutoModelForCausalLM.from_pretrained(qdir, device_map="cpu", dtype=torch.float16,
                                                     quantization_config=GPTQConfig(bits=config["bits"], backend="torch"))
    else:
        backend = BACKEND.AWQ_TORCH if method == "awq" else BACKEND.TORCH
        model = GPTQModel.load(qdir, device="cpu", dtype=torch.float16, backend=backend).model
    generator = torch.Generator().manual_seed(1)
    dump = {}
    for name, module in model.named_modules():
        if not isinstance(module, BaseQuantLinear):
            continue
        x = torch.randn(4, module.in_features, generator=generator).to(torch.float16)
        with torch.no_grad():
            dump[f"{name}/output"] = module(x).float().numpy()
            dump[f"{name}/input"] = x.float().numpy()
            dump[f"{name}/weight"] = _own_weight(module, method).float().numpy()
    np.savez(npz, **dump)


def _own_weight(module, method: str) -> torch.Tensor:
    """The module's own dequantization, `[out, in]`."""
    if method == "awq":
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        return dequantize_gemm(module.qweight, module.qzeros, module.scales, module.bits, module.group_size).T
    return module.dequantize_weight().T


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "load":
        load(*args)
    elif command == "dense":
        tiny_llama(args[0])
    elif args[1] == "awq":
        produce(args[0], "awq", int(args[2]), int(args[3]), dtype=args[4] if len(args) > 4 else "float16")
    else:
        produce(args[0], "gptq", int(args[2]), int(args[3]), args[4] == "sym", args[5] == "act", args[6], *args[7:8])
