"""verify --logits: what quantization did to the model's next-token distribution.

Both checkpoints' weights come through quantkit's own readers (a dense or quantized safetensors folder,
dequantized by its registered reader; a GGUF by gguf-py), so any two formats compare and what is measured
is quantization, not a runtime's kernels. The forward pass is transformers' own code, one module's
weights in memory at a time (quantkit.layerwise, imported only here and only for --logits). Reported per
position and in total: KL(P_reference || P_checkpoint), top-1 agreement, each model's perplexity.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import tempfile
from pathlib import Path

import numpy as np

from quantkit import api, dtypes, methods
from quantkit.api import Check, DenseWeights
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import ShardReader
from quantkit.io.source import Checkpoint, open_checkpoint
from quantkit.io.stream import TensorReads
from quantkit.numerics import CHUNK_ELEMENTS
from quantkit.plan import dequantizer_for

INSTALL = "pip install 'quantkit[logits]'  (transformers >= 5 and torch)"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")

# Prose written for quantkit (no third-party text): about 400 tokens with common tokenizers.
BUILTIN_TEXT = """\
The harbour town woke slowly on the first cold morning of autumn. Fishing boats rocked against the stone \
quay, their ropes creaking, while gulls argued over scraps left on the nets. Above the water, the baker \
had already opened her shutters, and the smell of warm bread drifted down the narrow street toward the sea.

Maria walked to the library before anyone else was awake. She carried a notebook, two pencils and a thermos \
of strong tea. For three weeks she had been reading about the old lighthouse on the northern cliff: who built \
it, why it was abandoned, and what the keepers wrote in their logbooks during the long winter storms. Most \
entries were short and practical. "Wind from the east, rain after midnight, lamp cleaned twice." A few were \
not. One keeper described a ship that appeared in the fog, sounded its horn three times, and vanished before \
dawn without leaving a trace in any harbour record.

The librarian, a patient man with round glasses, had found her a box of letters that nobody had opened in \
forty years. Inside were receipts for lamp oil, a drawing of the tower with careful measurements, and a \
photograph of a family standing beside the door, squinting into the sun. On the back someone had written a \
date and a single word: "Home."

Science offers a different kind of story. When light passes through a prism, it spreads into a band of \
colours because each wavelength bends by a slightly different amount. Engineers use the same principle to \
measure the composition of distant stars, the purity of water, and the ripeness of fruit on a conveyor belt. \
A simple idea, tested carefully and repeated many times, often becomes a tool that changes how people work.

By noon the fog had lifted. Maria closed the box, thanked the librarian, and walked up the cliff path to the \
lighthouse. The door was locked, but the view was open to everyone: grey water, a line of pale sky, and \
three small boats heading home with their morning catch. She sat on a flat rock, opened her notebook, and \
began to write the first page of the history she had promised to finish before spring.
"""


def transformers_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def require_transformers() -> None:
    if not transformers_available():
        raise QuantkitError("verify --logits needs transformers and torch", INSTALL)
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise QuantkitError(f"verify --logits needs transformers >= 5 (found {transformers.__version__})", INSTALL)


# ------------------------------------------------------------------------------------------- weights


class _Collect:
    """A sink filling one dense tensor with what a dequantizer writes (float32 rows, in order)."""

    def __init__(self, name: str, shape: tuple[int, ...]):
        self.name, self.values, self.filled = name, np.empty(shape, np.float32), 0

    def write(self, name: str, chunk) -> None:
        if name != self.name:
            return
        flat = np.frombuffer(chunk, np.float32) if isinstance(chunk, bytes) else chunk.reshape(-1).view(np.float32)
        self.values.reshape(-1)[self.filled : self.filled + flat.size] = flat
        self.filled += flat.size

    def done(self, name: str) -> None:
        if name == self.name and self.filled != self.values.size:
            raise QuantkitError(f"'{name}': the reader gave {self.filled} values for shape {list(self.values.shape)}")


def folder_weights(checkpoint: Checkpoint) -> DenseWeights:
    """A safetensors folder as dense tensors: each quantized module's weight dequantized when read."""
    modules: dict[str, list[str]] = {}
    dense: dict[str, tuple[str, tuple[int, ...]]] = {}  # dense name -> (module, shape)
    dequantizer = None
    if checkpoint.quantization_config is not None:
        dequantizer = dequantizer_for(checkpoint)
        modules = dequantizer.modules(checkpoint)
        for module, names in modules.items():
            for out in dequantizer.layout(checkpoint, module, names, "F32"):
                dense[out.name] = (module, tuple(out.shape))
    consumed = {n for names in modules.values() for n in names}
    plain = {n: info for n, info in checkpoint.tensors.items() if n not in consumed}
    shapes = {n: tuple(info.shape) for n, info in plain.items()} | {n: shape for n, (_, shape) in dense.items()}

    def read(name: str) -> np.ndarray:
        if name in dense:
            module, shape = dense[name]
            sink = _Collect(name, shape)
            with ShardReader(checkpoint.tensors[modules[module][0]].file) as reader:
                dequantizer.dequantize(checkpoint, module, modules[module], TensorReads(checkpoint, reader), "F32", sink)
            return sink.values
        return read_rows(name, 0, plain[name].shape[0] if plain[name].shape else 1)

    def read_rows(name: str, start: int, stop: int) -> np.ndarray:
        """float32 rows, converted a chunk at a time into the result (a bf16 matrix widened whole would
        take three times its float32 size at once)."""
        info = plain[name]
        if not info.shape:
            with ShardReader(info.file) as reader:
                return dtypes.to_float32(reader.read(info), info.dtype)
        values = np.empty((stop - start, *info.shape[1:]), np.float32)
        step = max(1, CHUNK_ELEMENTS // max(1, math.prod(info.shape[1:])))
        with ShardReader(info.file) as reader:
            for first in range(start, stop, step):
                last = min(stop, first + step)
                values[first - start : last - start] = dtypes.to_float32(reader.read_rows(info, first, last), info.dtype)
        return values

    rows = frozenset(n for n, info in plain.items() if info.dtype in dtypes.FLOATS and len(info.shape) == 2)
    return DenseWeights(checkpoint.config, shapes, read, read_rows, rows, lambda scratch: checkpoint.root)


def open_weights(path: Path) -> DenseWeights:
    methods.load()
    file_format = api.file_format_of(path)
    return file_format.weights(path) if file_format else folder_weights(open_checkpoint(path))


# ------------------------------------------------------------------------------------------- figures


def tokenize(folder: Path, text: str, n_tokens: int | None) -> list[int]:
    """Token ids of `text` by the checkpoint's own tokenizer (special tokens as it adds them, e.g. BOS),
    the first `n_tokens` of them; tokenizer.json through `tokenizers`, else transformers' AutoTokenizer."""
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.no_truncation()  # tokenizer.json may carry a truncation or padding setting
        tokenizer.no_padding()
        ids = tokenizer.encode(text, add_special_tokens=True).ids
    else:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(str(folder))(text, add_special_tokens=True, truncation=False)["input_ids"]
    ids = list(ids)[:n_tokens]
    if len(ids) < 2:
        raise QuantkitError(f"the text gives {len(ids)} token(s) with {folder}'s tokenizer; at least 2 are needed")
    return ids


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def logit_stats(reference: np.ndarray, logits: np.ndarray, token_ids: list[int], chunk: int = 16) -> dict:
    """KL(P_reference || P) per position (nats, float64), its mean / median / p99 / max, top-1 agreement,
    and each model's perplexity on the text (exp of the mean NLL of token t+1 at position t)."""
    if reference.shape != logits.shape or reference.ndim != 2 or reference.shape[0] != len(token_ids):
        raise QuantkitError(f"the checkpoints' logits differ in shape ({reference.shape} vs {logits.shape}): "
                            "not the same vocabulary")
    n = len(token_ids)
    kl = np.empty(n)
    agree = reference.argmax(-1) == logits.argmax(-1)
    nll = np.zeros((2, n - 1))
    following = np.asarray(token_ids[1:])
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        lr, lq = _log_softmax(reference[s:e]), _log_softmax(logits[s:e])
        kl[s:e] = np.maximum((np.exp(lr) * (lr - lq)).sum(-1), 0.0)  # rounding can give -1e-17
        scored = np.arange(s, min(e, n - 1))
        nll[0, scored] = -lr[scored - s, following[scored]]
        nll[1, scored] = -lq[scored - s, following[scored]]
    return {
        "tokens": n,
        "kl": {"mean": float(kl.mean()), "median": float(np.median(kl)), "p99": float(np.percentile(kl, 99)),
               "max": float(kl.max())},
        "top1_agreement": float(agree.mean()),
        "perplexity": {"reference": float(np.exp(nll[0].mean())), "checkpoint": float(np.exp(nll[1].mean()))},
        "per_position": {"kl": kl.tolist(), "top1_agree": agree.tolist()},
    }


def compare(path: Path, reference: Path, text: str | None = None, n_tokens: int = 256,
            max_kl: float | None = None) -> tuple[Check, dict]:
    """The `logits` check: both checkpoints run on the same tokens; fails when mean KL exceeds `max_kl`."""
    require_transformers()
    from quantkit import layerwise  # imports torch and transformers

    ref_weights, weights = open_weights(reference), open_weights(path)
    with tempfile.TemporaryDirectory(prefix="quantkit-tokenizer-") as scratch:
        folder = next((f for f in (w.tokenizer(Path(scratch)) for w in (ref_weights, weights))
                       if any((f / name).is_file() for name in TOKENIZER_FILES)), None)
        if folder is None:
            raise QuantkitError(f"{reference}: no tokenizer files (tokenizer.json, tokenizer.model, vocab.*) beside "
                                "either checkpoint", "copy the source's tokenizer files into the folder")
        token_ids = tokenize(folder, BUILTIN_TEXT if text is None else text, n_tokens)
    vocab = ref_weights.config.get("vocab_size")
    if isinstance(vocab, int) and max(token_ids) >= vocab:
        raise QuantkitError(f"{folder}: the tokenizer gives id {max(token_ids)}, beyond vocab_size {vocab}")
    expected = layerwise.logits(ref_weights, token_ids)
    gc.collect()
    stats = logit_stats(expected, layerwise.logits(weights, token_ids), token_ids)
    stats |= {"reference": str(reference), "max_kl": max_kl}
    kl, ppl = stats["kl"], stats["perplexity"]
    detail = (f"KL mean {kl['mean']:.4g} nats (median {kl['median']:.4g}, p99 {kl['p99']:.4g}, max {kl['max']:.4g}), "
              f"top-1 agreement {stats['top1_agreement']:.1%}, perplexity {ppl['reference']:.4g} -> {ppl['checkpoint']:.4g}, "
              f"{len(token_ids)} tokens")
    ok = max_kl is None or kl["mean"] <= max_kl
    if max_kl is not None:
        detail += f"; mean KL {'within' if ok else 'above'} --max-kl {max_kl:g}"
    return Check("logits", ok, detail), stats
