"""make bench: quantkit against the tools people use today, in one run, on the same generated checkpoint.

A random bf16 Llama of ~1 GB (4 shards) is generated once and cached outside the repo. Each job runs
as its own process under /usr/bin/time -v, so wall time and peak RSS include start-up:
  quantkit quantize nf4 / int8 / gptq / fp8 (compressed-tensors and fine-grained layouts), dequantize nf4 and
  fp8, convert --to gguf Q8_0 and Q4_K_M, quantized sources to other formats, verify --logits --tokens 256
  (the nf4 output against the source: both forward passes, every check verify runs);
  anchors: transformers + bitsandbytes load-quantize-save (nf4, int8), bitsandbytes dequantize_4bit
  of every weight, gguf-py's own Q8_0 quantizer, llm-compressor's model_free_ptq FP8_DYNAMIC (in
  .venv-llmc, which make test-clients installs); for Q4_K_M, llama-quantize from a BF16 GGUF (written by
  quantkit, not timed) and the user's route, llama.cpp's convert_hf_to_gguf.py then llama-quantize, both
  from .clients/ (scripts/install_clients.py builds them), with as many threads as quantkit uses.
The nf4, int8, fp8 and Q4_K_M outputs are compared tensor for tensor with the anchors' (identical bytes or it fails).

Dequantize jobs also give output MB/s (dense bytes written per second), beside the disk's own speed measured
in the same run with dd (1 GB written with O_DIRECT and fsync, read back with O_DIRECT: no page cache).
quantkit's bytecode is compiled before anything is timed, as pip does at install (a run with
PYTHONDONTWRITEBYTECODE and no __pycache__ otherwise compiles every module it imports, each time).
--only fp8: the FP8 jobs alone (quantize fp8 in both layouts and with --no-sync, dequantize both; at --size 1 with
model_free_ptq beside them), e.g. at --size 10.

    python scripts/bench.py [--size GB] [--only quantkit|gguf|fp8] [--job TEXT ...] [--json]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("QUANTKIT_BENCH_CACHE", Path.home() / ".cache" / "quantkit-bench"))
PY = sys.executable
LLMC_PY = ROOT / ".venv-llmc" / "bin" / "python"
LLAMA_CPP = ROOT / ".clients" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
LLAMA_QUANTIZE = ROOT / ".clients" / "llama.cpp-build" / "bin" / "llama-quantize"
THREADS = str(os.cpu_count() or 2)

ANCHOR_QUANTIZE = """
import sys, torch, warnings
warnings.filterwarnings("ignore")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
kind = sys.argv[3]
config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") if kind == "nf4" else BitsAndBytesConfig(load_in_8bit=True)
AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=config, device_map="cpu").save_pretrained(sys.argv[2])
"""
ANCHOR_FP8 = """
import sys
from llmcompressor import model_free_ptq
model_free_ptq(sys.argv[1], sys.argv[2], scheme="FP8_DYNAMIC", ignore=["lm_head", "re:.*embed_tokens$"], max_workers=1, device="cpu")
"""
ANCHOR_DEQUANTIZE = """
import sys, json, torch, bitsandbytes.functional as F
from pathlib import Path
from bitsandbytes.functional import QuantState
from safetensors import safe_open
from safetensors.torch import save_file
src, out = Path(sys.argv[1]), Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
for shard in sorted(src.glob("*.safetensors")):
    dense = {}
    with safe_open(shard, "pt") as f:
        keys = list(f.keys())
        for key in keys:
            if key.endswith(".quant_state.bitsandbytes__nf4"):
                weight = key.split(".quant_state.")[0]
                parts = {k[len(weight) + 1:]: f.get_tensor(k) for k in keys if k.startswith(weight + ".")}
                dense[weight] = F.dequantize_4bit(f.get_tensor(weight), QuantState.from_dict(parts, "cpu"))
    save_file(dense, out / shard.name)
"""
ANCHOR_GGUF_Q8 = """
import sys, numpy as np, gguf
from pathlib import Path
from safetensors import safe_open
writer = gguf.GGUFWriter(sys.argv[2], "llama")
for shard in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(shard, "pt") as f:
        for key in f.keys():
            x = f.get_tensor(key).float().numpy()
            if x.ndim == 2:
                writer.add_tensor(key, gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(key, x)
writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
"""


def make_checkpoint(size_gb: float) -> Path:
    """A random bf16 LlamaForCausalLM of about `size_gb` GB in 4 shards, written once and cached."""
    hidden, inter, vocab = 2048, 5504, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((size_gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer))
    folder = CACHE / f"llama-bf16-{layers}L"
    if (folder / "config.json").exists():
        write_tokenizer(folder)  # checkpoints cached before verify --logits was benched have none
        return folder
    sys.path.insert(0, str(ROOT))
    from quantkit.dtypes import bf16_bits
    from quantkit.io.safetensors import CheckpointWriter, OutputTensor

    tensors = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
        tensors += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        tensors += [(p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                    (p + "mlp.down_proj.weight", (hidden, inter))]  # fmt: skip
    tensors += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    total = sum(int(np.prod(s)) * 2 for _, s in tensors)
    tmp = Path(tempfile.mkdtemp(dir=CACHE.parent if CACHE.parent.exists() else None))
    writer = CheckpointWriter(tmp, [OutputTensor(n, "BF16", s) for n, s in tensors], total // 4 + 1)
    rng = np.random.default_rng(0)
    for name, shape in tensors:
        values = np.ones(shape, np.float32) if len(shape) == 1 else (rng.standard_normal(shape, np.float32) * np.float32(0.02))
        writer.write(name, bf16_bits(values))
        writer.done(name)
    writer.finish()
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "dtype": "bfloat16", "hidden_act": "silu",
    }  # fmt: skip
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(tmp)
    CACHE.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, folder)
    return folder


def with_tokenizer(src: Path) -> Path:
    """The checkpoint beside a small sentencepiece tokenizer.model (llama.cpp's converter needs a vocab; it
    pads it to the model's 32000), files hard-linked (quantkit refuses shards that a symlink puts outside
    the folder), not copied. Cached."""
    folder = src.parent / (src.name + "-spm")
    if (folder / "tokenizer.model").exists():
        return folder
    sys.path.insert(0, str(ROOT))
    from tests.gguf_checkpoints import train_sentencepiece

    tmp = Path(tempfile.mkdtemp(dir=src.parent))
    for f in src.iterdir():
        os.link(f, tmp / f.name)
    train_sentencepiece(tmp, 320)
    os.rename(tmp, folder)
    return folder


def same_gguf_tensors(a: Path, b: Path) -> bool:
    sys.path.insert(0, str(ROOT))
    from quantkit.methods.gguf.file import read_gguf

    fa, fb = read_gguf(a), read_gguf(b)
    ta, tb = {t.name: t for t in fa.tensors}, {t.name: t for t in fb.tensors}
    return ta.keys() == tb.keys() and all(ta[n].qtype == tb[n].qtype and fa.rows(ta[n]).tobytes() == fb.rows(tb[n]).tobytes()
                                          for n in ta)


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer.json trained on quantkit's built-in text (ids well below the vocab), so
    that verify --logits can tokenize with the checkpoint's own tokenizer."""
    if (folder / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    sys.path.insert(0, str(ROOT))
    from quantkit.logits import BUILTIN_TEXT

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator([BUILTIN_TEXT], trainers.BpeTrainer(vocab_size=1000, show_progress=False,
                                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(folder / "tokenizer.json"))


def timed(label: str, argv: list[str], output: Path, input_bytes: int, repeat: int) -> dict:
    """Run argv under /usr/bin/time -v `repeat` times: median wall seconds, median CPU seconds (user + system,
    steadier than wall time on a shared machine), largest peak RSS (MB), input MB/s. Each run starts after
    a sync, so none pays for the previous one's writeback (this machine's disk makes single runs vary by 2x),
    and with its `output` removed beforehand, so none pays for deleting the previous one's either."""
    walls, cpus, peaks = [], [], []
    for _ in range(repeat):
        if output.is_dir():
            shutil.rmtree(output)
        output.unlink(missing_ok=True)
        os.sync()
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})  # fmt: skip
        walls.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
        peaks.append(int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)))
        cpus.append(sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", proc.stderr).group(1)) for kind in ("User", "System")))
    wall = sorted(walls)[len(walls) // 2]
    written = sum(f.stat().st_size for f in output.rglob("*") if f.is_file()) if output.is_dir() else \
        output.stat().st_size if output.exists() else 0  # fmt: skip
    return {"job": label, "seconds": round(wall, 2), "runs": [round(w, 2) for w in walls], "cpu_seconds": round(sorted(cpus)[len(cpus) // 2], 2),
            "peak_rss_mb": round(max(peaks) / 1024), "mb_per_s": round(input_bytes / 1e6 / wall, 1),
            "out_mb_per_s": round(written / 1e6 / wall, 1)}


def same_tensors(a: Path, b: Path, common_only: bool = False) -> bool:
    """Tensor-for-tensor byte equality of two safetensors folders (any sharding); `common_only`: of the
    tensors both hold (the dequantize anchor writes only the weights it dequantized)."""
    sys.path.insert(0, str(ROOT))
    from quantkit.io.safetensors import ShardReader, read_header

    ta, tb = ({n: i for f in sorted(d.glob("*.safetensors")) for n, i in read_header(f)[0].items()} for d in (a, b))
    names = set(ta) & set(tb)
    if not names or (not common_only and set(ta) != set(tb)):
        return False
    for name in sorted(names):
        info, other = ta[name], tb[name]
        if (info.dtype, info.shape) != (other.dtype, other.shape):
            return False
        with ShardReader(info.file) as ra, ShardReader(other.file) as rb:
            if not np.array_equal(ra.read(info), rb.read(other)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=1.0, help="checkpoint size in GB (e.g. 10 to show memory stays flat)")
    parser.add_argument("--only", choices=["all", "quantkit", "gguf", "fp8"], default="all",
                        help="quantkit: skip the anchors (they take minutes); gguf: only Q4_K_M and its anchors; fp8: the FP8 jobs")
    parser.add_argument("--repeat", type=int, default=3, help="runs per job; the median is reported")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--job", action="append", help="only the jobs whose name holds this text (repeatable; a job an output "
                                                         "needs must be named too), e.g. --job 'gptq 4-bit' --job w4a16")
    parser.add_argument("--checkpoint-only", action="store_true",
                        help="make the bench checkpoint (once), print its folder and stop (make examples)")
    args = parser.parse_args()

    src = make_checkpoint(args.size)
    if args.checkpoint_only:
        print(src)
        return
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    work = Path(tempfile.mkdtemp(prefix="quantkit-bench-"))
    qk = [PY, "-m", "quantkit"]
    compileall.compile_dir(ROOT / "quantkit", quiet=1)
    try:
        subprocess.run([*qk, "quantize", str(src), str(work / "warm"), "--method", "int8", "--max-shard-size", "1GB"],
                       check=True, capture_output=True)  # reads the checkpoint into the page cache; not timed
        shutil.rmtree(work / "warm")
        jobs = [
            ("quantkit nf4", [*qk, "quantize", str(src), str(work / "qk-nf4"), "--method", "nf4"], work / "qk-nf4", size),
            ("quantkit int8", [*qk, "quantize", str(src), str(work / "qk-int8"), "--method", "int8"], work / "qk-int8", size),
            ("quantkit gptq 4-bit", [*qk, "quantize", str(src), str(work / "qk-gptq"), "--method", "gptq", "--bits", "4"], work / "qk-gptq", size),
            ("quantkit w4a16", [*qk, "quantize", str(src), str(work / "qk-w4a16"), "--method", "w4a16"], work / "qk-w4a16", size),
            ("quantkit fp8", [*qk, "quantize", str(src), str(work / "qk-fp8"), "--method", "fp8"], work / "qk-fp8", size),
            # as model_free_ptq writes: done once the bytes are in the page cache (no fsync)
            ("quantkit fp8 --no-sync", [*qk, "quantize", str(src), str(work / "qk-fp8-nosync"), "--method", "fp8", "--no-sync"],
             work / "qk-fp8-nosync", size),
            ("quantkit dequantize nf4", [*qk, "dequantize", str(work / "qk-nf4"), str(work / "qk-dense")], work / "qk-dense", size),
            ("quantkit fp8 (fp8 layout)", [*qk, "quantize", str(src), str(work / "qk-fp8-fine"), "--method", "fp8-block", "--layout", "fp8"], work / "qk-fp8-fine", size),
            ("quantkit dequantize fp8", [*qk, "dequantize", str(work / "qk-fp8-fine"), str(work / "qk-fp8-dense")], work / "qk-fp8-dense", size),
            ("quantkit dequantize fp8 (c-t)", [*qk, "dequantize", str(work / "qk-fp8"), str(work / "qk-fp8-ct-dense")], work / "qk-fp8-ct-dense",
             size),
            ("quantkit gguf Q8_0", [*qk, "convert", str(src), str(work / "qk.gguf"), "--to", "gguf", "--gguf-type", "Q8_0"], work / "qk.gguf", size),
            # quantized -> quantized (#15): against the slower of "dequantize" and "quantize" alone
            ("quantkit nf4 -> Q8_0", [*qk, "convert", str(work / "qk-nf4"), str(work / "nf4.gguf"), "--to", "gguf", "--gguf-type", "Q8_0"], work / "nf4.gguf", size),
            ("quantkit dequantize gptq", [*qk, "dequantize", str(work / "qk-gptq"), str(work / "gptq-dense")], work / "gptq-dense", size),
            ("quantkit gguf Q4_0", [*qk, "convert", str(src), str(work / "q4.gguf"), "--to", "gguf", "--gguf-type", "Q4_0"], work / "q4.gguf", size),
            ("quantkit gptq -> Q4_0 (lossless)", [*qk, "convert", str(work / "qk-gptq"), str(work / "gptq.gguf"), "--to", "gguf", "--gguf-type", "Q4_0"], work / "gptq.gguf", size),
            ("quantkit verify --logits nf4", [*qk, "verify", str(work / "qk-nf4"), "--reference", str(src), "--logits", "--tokens", "256",
                                              "--json"], work / "no-output", 2 * size),
        ]
        disk = 1 << 30
        jobs += [("disk write 1 GB (dd, direct)", ["dd", "if=/dev/zero", f"of={work / 'dd'}", "bs=8M", f"count={disk >> 23}", "oflag=direct",
                                                   "conv=fsync"], work / "dd", disk),
                 ("disk read 1 GB (dd, direct)", ["dd", f"if={work / 'dd'}", "of=/dev/null", "bs=8M", "iflag=direct"], work / "no-output", disk)]
        if args.only == "fp8":
            jobs = [j for j in jobs if "fp8" in j[0] or j[0].startswith("disk")]
        else:  # the GGUF jobs need a sentencepiece vocab beside the checkpoint
            spm = with_tokenizer(src)
            q4km = [("quantkit gguf Q4_K_M", [*qk, "convert", str(spm), str(work / "qk-q4km.gguf"), "--to", "gguf", "--gguf-type", "Q4_K_M"],
                     work / "qk-q4km.gguf", size)]
            if args.only in ("all", "gguf"):
                subprocess.run([*qk, "convert", str(spm), str(work / "bf16.gguf"), "--to", "gguf", "--gguf-type", "BF16"], check=True,
                               capture_output=True)  # llama-quantize's input, not timed
                env = f"PYTHONPATH={LLAMA_CPP / 'gguf-py'}"
                q4km += [
                    ("llama-quantize Q4_K_M", [str(LLAMA_QUANTIZE), str(work / "bf16.gguf"), str(work / "lq-q4km.gguf"), "Q4_K_M", THREADS],
                     work / "lq-q4km.gguf", size),
                    ("convert_hf_to_gguf+llama-quantize", ["sh", "-c", f"{env} {PY} {LLAMA_CPP / 'convert_hf_to_gguf.py'} {spm} --outtype bf16 "
                                                          f"--outfile {work / 'hf-bf16.gguf'} && {LLAMA_QUANTIZE} {work / 'hf-bf16.gguf'} "
                                                          f"{work / 'hf-q4km.gguf'} Q4_K_M {THREADS}"], work / "hf-q4km.gguf", size),
                ]
            jobs = q4km if args.only == "gguf" else jobs + q4km
        if args.only == "all":
            jobs += [
                ("transformers+bnb nf4", [PY, "-c", ANCHOR_QUANTIZE, str(src), str(work / "tf-nf4"), "nf4"], work / "tf-nf4", size),
                ("transformers+bnb int8", [PY, "-c", ANCHOR_QUANTIZE, str(src), str(work / "tf-int8"), "int8"], work / "tf-int8", size),
                ("bitsandbytes dequantize nf4", [PY, "-c", ANCHOR_DEQUANTIZE, str(work / "qk-nf4"), str(work / "bnb-dense")], work / "bnb-dense", size),
                ("gguf-py Q8_0", [PY, "-c", ANCHOR_GGUF_Q8, str(src), str(work / "gguf-py.gguf")], work / "gguf-py.gguf", size),
            ]
        if args.only == "all" or (args.only == "fp8" and args.size <= 1):  # model_free_ptq takes minutes at 10 GB
            if not LLMC_PY.exists():
                raise SystemExit(f"{LLMC_PY} is missing: make test-clients installs llm-compressor there (or use --only quantkit)")
            jobs.append(("llm-compressor FP8_DYNAMIC", [str(LLMC_PY), "-c", ANCHOR_FP8, str(src), str(work / "llmc-fp8")], work / "llmc-fp8", size))
        if args.job:
            jobs = [j for j in jobs if any(part in j[0] for part in args.job)]
        results = {}
        for i, (label, argv, output, nbytes) in enumerate(jobs):
            results[label] = timed(label, argv, output, nbytes, args.repeat)
            # no anchor compares quantkit's outputs here: one no later job reads goes (at --size 10 all would need ~75 GB)
            compared = output.name in ("qk-fp8", "qk-fp8-nosync", "llmc-fp8") and "llm-compressor FP8_DYNAMIC" in [j[0] for j in jobs]
            if args.only in ("quantkit", "fp8") and not compared and not any(str(output) in arg for later in jobs[i + 1:] for arg in later[1]):
                if output.is_dir():
                    shutil.rmtree(output)
                output.unlink(missing_ok=True)
        anchors = {"quantkit nf4": "transformers+bnb nf4", "quantkit int8": "transformers+bnb int8",
                   "quantkit gptq 4-bit": "transformers+bnb nf4",
                   "quantkit dequantize nf4": "bitsandbytes dequantize nf4", "quantkit gguf Q8_0": "gguf-py Q8_0",
                   "quantkit fp8": "llm-compressor FP8_DYNAMIC", "quantkit fp8 --no-sync": "llm-compressor FP8_DYNAMIC",
                   "quantkit gguf Q4_K_M": "convert_hf_to_gguf+llama-quantize"}  # fmt: skip
        slower_of = {"quantkit nf4 -> Q8_0": ("quantkit dequantize nf4", "quantkit gguf Q8_0"),
                     "quantkit gptq -> Q4_0 (lossless)": ("quantkit dequantize gptq", "quantkit gguf Q4_0")}
        for label, parts in slower_of.items():
            if label in results and all(p in results for p in parts):
                results[label]["vs_slower_part"] = round(results[label]["seconds"] / max(results[p]["seconds"] for p in parts), 2)
        for label, anchor in anchors.items():
            if label in results and anchor in results:
                results[label]["vs_anchor"] = round(results[label]["seconds"] / results[anchor]["seconds"], 3)
                results[label]["cpu_vs_anchor"] = round(results[label]["cpu_seconds"] / results[anchor]["cpu_seconds"], 3)
        if "llama-quantize Q4_K_M" in results:
            results["quantkit gguf Q4_K_M"]["vs_llama_quantize"] = round(
                results["quantkit gguf Q4_K_M"]["seconds"] / results["llama-quantize Q4_K_M"]["seconds"], 3)
            results["quantkit gguf Q4_K_M"]["cpu_vs_llama_quantize"] = round(
                results["quantkit gguf Q4_K_M"]["cpu_seconds"] / results["llama-quantize Q4_K_M"]["cpu_seconds"], 3)
        identical = {}
        compare = [("nf4", "quantkit nf4", "transformers+bnb nf4", lambda: same_tensors(work / "qk-nf4", work / "tf-nf4")),
                   ("int8", "quantkit int8", "transformers+bnb int8", lambda: same_tensors(work / "qk-int8", work / "tf-int8")),
                   ("dequantize nf4", "quantkit dequantize nf4", "bitsandbytes dequantize nf4",
                    lambda: same_tensors(work / "qk-dense", work / "bnb-dense", common_only=True)),
                   ("fp8", "quantkit fp8", "llm-compressor FP8_DYNAMIC", lambda: same_tensors(work / "qk-fp8", work / "llmc-fp8")),
                   ("fp8 --no-sync", "quantkit fp8 --no-sync", "llm-compressor FP8_DYNAMIC",
                    lambda: same_tensors(work / "qk-fp8-nosync", work / "llmc-fp8")),
                   ("gguf Q4_K_M", "quantkit gguf Q4_K_M", "llama-quantize Q4_K_M",
                    lambda: same_gguf_tensors(work / "qk-q4km.gguf", work / "lq-q4km.gguf"))]
        for name, ours, theirs, same in compare:
            if ours in results and theirs in results:
                identical[name] = same()
        report = {"checkpoint": str(src), "input_mb": round(size / 1e6), "results": list(results.values()), "identical_to_transformers": identical}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"checkpoint {report['checkpoint']} ({report['input_mb']} MB bf16)")
    print(f"{'job':32} {'seconds':>8} {'cpu s':>6} {'MB/s':>8} {'out MB/s':>8} {'peak RSS MB':>12} {'vs anchor':>10}  runs")
    for r in report["results"]:
        print(f"{r['job']:32} {r['seconds']:8.2f} {r['cpu_seconds']:6.2f} {r['mb_per_s']:8.1f} {r['out_mb_per_s']:8.1f} {r['peak_rss_mb']:12d} "
              f"{r.get('vs_anchor', r.get('vs_slower_part', '')):>10}  {r['runs']}"
              + (f"  cpu vs anchor {r['cpu_vs_anchor']}" if "cpu_vs_anchor" in r else "")
              + (f"  vs llama-quantize {r['vs_llama_quantize']} (cpu {r['cpu_vs_llama_quantize']})" if "vs_llama_quantize" in r else ""))
    if identical:
        print("identical bytes to the anchors (transformers + bitsandbytes; bitsandbytes dequantize_4bit; llm-compressor; llama-quantize): "
              + ", ".join(f"{k}: {v}" for k, v in identical.items()))
    if identical and not all(identical.values()):
        raise SystemExit("output differs from the anchors'")


if __name__ == "__main__":
    main()
