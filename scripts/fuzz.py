"""Fuzz the parsers that read untrusted files: safetensors headers, index files, GGUF, PyTorch pickles.

Hypothesis mutates valid files (byte flips, truncation, forged integers, rewritten JSON) and hands them to
the validating readers. A QuantkitError is the expected answer to damage; any other exception, a run past
HANG_SECONDS, or an allocation past the memory cap is a bug, reported with the input that
caused it (saved under --findings).

    .venv/bin/python scripts/fuzz.py --minutes 3
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.io.safetensors import INDEX_NAME, read_header  # noqa: E402
from quantkit.io.source import open_checkpoint  # noqa: E402
from quantkit.io.torchpickle import read_state_dict_meta  # noqa: E402
from quantkit.methods.gguf import file as gf  # noqa: E402
from quantkit.methods.gguf.convert import gguf_to_safetensors  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="quantkit-fuzz-"))
INTERESTING = [0, 1, 7, 8, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**50, 2**63 - 1, 2**63, 2**64 - 1]
DTYPES = ["F32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "I64", "F8_E4M3", "F33", "", None, 3]


# ---------------------------------------------------------------- seeds: small valid files


def safetensors_seed() -> bytes:
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    return save({"a.weight": rng.standard_normal((4, 8), dtype=np.float32), "b": np.arange(6, dtype=np.int8),
                 "c": np.zeros((0, 3), np.float16), "s": np.array(2.0, np.float32)}, metadata={"format": "pt"})  # fmt: skip


def gguf_seed() -> bytes:
    from gguf import GGMLQuantizationType, GGUFWriter

    path = WORK / "seed.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_string("general.name", "fuzz")
    for key, value in (("embedding_length", 32), ("feed_forward_length", 32), ("attention.head_count", 4),
                       ("context_length", 64)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_uint32("general.file_type", 7)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "ab", "<s>"])
    writer.add_array("tokenizer.ggml.token_type", [1, 1, 1, 3])
    writer.add_array("tokenizer.ggml.merges", ["a b"])
    writer.add_uint32("tokenizer.ggml.bos_token_id", 3)
    writer.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((2, 32), dtype=np.float32))
    q8 = np.zeros((2, 34), np.uint8)
    writer.add_tensor("blk.0.ffn_up.weight", q8, raw_shape=(2, 34), raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def torch_seeds() -> tuple[bytes, bytes]:
    """The same state dict as torch.save writes it: zip format, and the legacy (pre-1.6) pickle stream."""
    import torch

    state = {"w": torch.zeros(3, 4), "b": torch.ones(2, dtype=torch.bfloat16), "v": torch.arange(6)[2:4]}
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save(state, zipped)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    return zipped.getvalue(), legacy.getvalue()


def rezip(archive: bytes, pickle_bytes: bytes) -> bytes:
    """`archive` with its data.pkl replaced (and checksummed) so that damage reaches the unpickler."""
    with zipfile.ZipFile(io.BytesIO(archive)) as source:
        members = {name: source.read(name) for name in source.namelist()}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for name, data in members.items():
            target.writestr(name, pickle_bytes if name.endswith("/data.pkl") else data)
    return out.getvalue()


def data_pkl(archive: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(archive)) as source:
        return source.read(next(n for n in source.namelist() if n.endswith("/data.pkl")))


# ---------------------------------------------------------------- mutations


@st.composite
def mutated(draw, seed: bytes, hot: int) -> bytes:
    """`seed` after a few random edits, most of them in its first `hot` bytes (where the structure is)."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "int", "truncate", "insert", "delete"]))
        limit = max(1, min(len(data), hot))
        at = draw(st.integers(0, limit - 1)) if data else 0
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "int" and len(data) >= 8:
            width = draw(st.sampled_from([4, 8]))
            at = min(at, len(data) - width)
            value = draw(st.sampled_from(INTERESTING)) % (1 << (8 * width))
            data[at : at + width] = value.to_bytes(width, "little")
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                           max_leaves=8)  # fmt: skip


@st.composite
def forged_header(draw) -> bytes:
    """A safetensors file whose JSON header is drawn entry by entry: odd dtypes, shapes and offsets."""
    header: dict = {}
    for i in range(draw(st.integers(0, 4))):
        entry = {
            "dtype": draw(st.sampled_from(DTYPES)),
            "shape": draw(st.one_of(st.lists(st.sampled_from([0, 1, 2, 3, 2**31, 2**62, -1]), max_size=4), json_values)),
            "data_offsets": draw(st.one_of(st.lists(st.sampled_from([0, 1, 4, 8, 12, 2**40, 2**64, -4]), min_size=2, max_size=2),
                                           json_values)),
        }  # fmt: skip
        if draw(st.booleans()):
            entry.pop(draw(st.sampled_from(list(entry))))
        header[draw(st.sampled_from([f"t{i}", "__metadata__", ""]))] = entry if draw(st.integers(0, 9)) else draw(json_values)
    raw = nested(draw) if not draw(st.integers(0, 20)) else json.dumps(header).encode()
    length = len(raw) if draw(st.integers(0, 4)) else draw(st.sampled_from(INTERESTING))
    return struct.pack("<Q", length % 2**64) + raw + draw(st.binary(max_size=64))


def nested(draw) -> bytes:
    """JSON nested deeper than any parser's recursion limit."""
    depth = draw(st.sampled_from([10, 1000, 100_000]))
    return b'{"a":' * depth + b"1" + b"}" * depth if draw(st.booleans()) else b"[" * depth + b"]" * depth


PATHS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "../outside.safetensors", "/etc/passwd",
         "", ".", "sub/../model-00001-of-00002.safetensors", "link.safetensors", "missing.safetensors", "a\0b", "sub",
         "loop.safetensors", "x" * 300, "a/" * 3000]  # fmt: skip


@st.composite
def forged_index(draw) -> str:
    names = ["a.weight", "b.weight", "c.weight", "d.weight", "nope"]
    weight_map = draw(st.dictionaries(st.sampled_from(names), st.one_of(st.sampled_from(PATHS), json_values), max_size=6))
    index: object = {"metadata": draw(json_values), "weight_map": weight_map}
    if not draw(st.integers(0, 6)):
        index = draw(json_values)
    text = json.dumps(index) if draw(st.integers(0, 20)) else nested(draw).decode()
    if draw(st.integers(0, 3)) == 0 and weight_map:  # a duplicated key, which json.dumps cannot write
        text = text.replace('"weight_map": {', '"weight_map": {' + json.dumps(next(iter(weight_map))) + ': "x", ', 1)
    return text


# ---------------------------------------------------------------- targets


class Hang(Exception):
    """An example ran past HANG_SECONDS: a loop or allocation driven by a forged number."""


HANG_SECONDS = 10


def _hang(signum: int, frame: object) -> None:
    raise Hang(f"still running after {HANG_SECONDS} s")


def expect_quantkit_error(call: Callable[[], object]) -> None:
    signal.signal(signal.SIGALRM, _hang)
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    try:
        call()
    except QuantkitError:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def write(name: str, data: bytes) -> Path:
    path = WORK / name
    path.write_bytes(data)
    return path


def checkpoint_folder() -> Path:
    """A two-shard checkpoint with an index, a subfolder and a symlink leaving the folder."""
    from safetensors.numpy import save_file

    folder = WORK / "ckpt"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    save_file({"a.weight": np.zeros((2, 2), np.float32), "b.weight": np.ones(3, np.float16)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"c.weight": np.zeros(4, np.int8), "d.weight": np.zeros((1, 1), np.float32)}, str(folder / "model-00002-of-00002.safetensors"))
    (WORK / "outside.safetensors").write_bytes((folder / "model-00002-of-00002.safetensors").read_bytes())
    (folder / "link.safetensors").symlink_to(WORK / "outside.safetensors")
    (folder / "loop.safetensors").symlink_to(folder / "loop2.safetensors")
    (folder / "loop2.safetensors").symlink_to(folder / "loop.safetensors")
    return folder


def targets(examples: int) -> dict[str, Callable[[], None]]:
    common = settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    st_seed, gguf_bytes, (torch_zip, torch_legacy) = safetensors_seed(), gguf_seed(), torch_seeds()
    folder = checkpoint_folder()

    @common
    @given(mutated(st_seed, hot=8 + struct.unpack("<Q", st_seed[:8])[0]))
    def safetensors_bytes(data: bytes) -> None:
        expect_quantkit_error(lambda: read_header(write("m.safetensors", data)))

    @common
    @given(forged_header())
    def safetensors_header(data: bytes) -> None:
        expect_quantkit_error(lambda: read_header(write("h.safetensors", data)))

    @common
    @given(st.one_of(forged_index(), forged_index().map(lambda t: t.encode()).flatmap(lambda b: mutated(b, len(b)))))
    def index(text: str | bytes) -> None:
        raw = text if isinstance(text, bytes) else text.encode()
        (folder / INDEX_NAME).write_bytes(raw)
        expect_quantkit_error(lambda: open_checkpoint(folder))

    @common
    @given(mutated(gguf_bytes, hot=gf.read_gguf(write("seed.gguf", gguf_bytes)).data_offset))
    def gguf(data: bytes) -> None:
        expect_quantkit_error(lambda: gf.read_gguf(write("m.gguf", data)))

    @common
    @given(mutated(gguf_bytes, hot=gf.read_gguf(write("seed.gguf", gguf_bytes)).data_offset))
    def gguf_metadata(data: bytes) -> None:
        """What inspect and dequantize make of metadata and data once the reader has accepted the file."""
        path = write("meta.gguf", data)
        expect_quantkit_error(lambda: gf.inspect_file(path))
        expect_quantkit_error(lambda: gguf_to_safetensors(path, WORK / "dense", force=True))

    pkl = data_pkl(torch_zip)

    @common
    @given(st.one_of(mutated(pkl, len(pkl)).map(lambda p: rezip(torch_zip, p)), mutated(torch_legacy, hot=1200),
                     mutated(torch_zip, hot=len(torch_zip))))
    def torch_pickle(data: bytes) -> None:
        expect_quantkit_error(lambda: read_state_dict_meta(write("m.bin", data)))

    return {"safetensors-bytes": safetensors_bytes, "safetensors-header": safetensors_header, "index": index,
            "gguf": gguf, "gguf-metadata": gguf_metadata, "torch-pickle": torch_pickle}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="total time, shared evenly by the targets")
    parser.add_argument("--only", action="append", help="fuzz only this target (repeatable)")
    parser.add_argument("--findings", type=Path, default=Path("fuzz-findings"), help="where failing inputs are saved")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="address-space cap: a huge allocation is a finding")
    args = parser.parse_args()

    chosen = targets(examples=200)
    names = args.only or list(chosen)
    per_target = args.minutes * 60 / len(names)
    cap = int(args.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    found = 0
    for name in names:
        (args.findings / f"{name}.txt").unlink(missing_ok=True)
        started, rounds, failure = time.monotonic(), 0, None
        while time.monotonic() - started < per_target and failure is None:
            try:
                chosen[name]()
            except Exception:  # noqa: BLE001  - anything that is not a QuantkitError is what we are looking for
                failure = traceback.format_exc()
            rounds += 1
        print(f"{name:20s} {rounds * 200:7d} examples in {time.monotonic() - started:5.1f} s: "
              f"{'BUG' if failure else 'ok'}", flush=True)
        if failure:
            found += 1
            args.findings.mkdir(exist_ok=True)
            failure = "\n".join(line if len(line) < 400 else line[:400] + " ..." for line in failure.splitlines())
            (args.findings / f"{name}.txt").write_text(failure)
            print(failure, flush=True)
    shutil.rmtree(WORK, ignore_errors=True)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
