"""Fuzz the parsers that read untrusted files: safetensors headers, index files, GGUF, PyTorch pickles;
the values of config.json and of recipes; and where OUT goes (symlinks, '.', inside SRC, two runs at once).

Hypothesis mutates valid files (byte flips, truncation, forged integers, rewritten JSON) and hands them to
the validating readers. A QuantkitError is the expected answer to damage; any other exception, a run past
HANG_SECONDS, or an allocation past the memory cap is a bug, reported with the input that
caused it (saved under --findings). Output paths are held to the promises of the README's Output safety:
the source is never modified, nothing half-written is left beside OUT, and an OUT reported written verifies.

    .venv/bin/python scripts/fuzz.py --minutes 3
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quantkit import pipeline  # noqa: E402
from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.io.safetensors import INDEX_NAME, read_header  # noqa: E402
from quantkit.io.source import open_checkpoint  # noqa: E402
from quantkit.io.torchpickle import read_state_dict_meta  # noqa: E402
from quantkit.methods.gguf import file as gf  # noqa: E402
from quantkit.methods.gguf.convert import gguf_to_safetensors  # noqa: E402
from quantkit.plan import load_recipe, merge_options  # noqa: E402
from tests.hostile_files import CONFIG, tiny_tensors, write_checkpoint  # noqa: E402

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


# ---------------------------------------------------------------- config values, recipes, output paths

HOSTILE_VALUES = st.one_of(
    st.sampled_from([None, True, False, 0, -1, 1, 2**31, 2**32, 2**40, 2**63, 2**64, 10**30, "", "x", "64", [], [5], {}, {"a": 1}]),
    st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.lists(st.integers(), max_size=3),
)
CONFIG_KEYS = [*CONFIG, "head_dim", "rope_theta", "rope_parameters", "rope_scaling", "pad_token_id", "bos_token_id",
               "eos_token_id", "torch_dtype", "dtype", "quantization_config", "tie_word_embeddings"]


@st.composite
def hostile_config(draw) -> str:
    """CONFIG with a few keys given hostile values (non-finite floats are written as JSON's NaN/Infinity)."""
    config = dict(CONFIG)
    for key in draw(st.lists(st.sampled_from(CONFIG_KEYS), min_size=1, max_size=3, unique=True)):
        config[key] = draw(HOSTILE_VALUES)
    if draw(st.booleans()):
        config["rope_parameters"] = {"rope_type": draw(HOSTILE_VALUES), "rope_theta": draw(HOSTILE_VALUES)}
    return json.dumps(config)


RECIPE_KEYS = ["method", "bits", "group_size", "sym", "format", "optimize", "double_quant", "blocksize", "compute_dtype",
               "quant_storage", "skip", "backend", "device", "max_shard_size", "description", "nonsense"]


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value == float("inf") else "-inf" if value == float("-inf") else repr(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        return '""'
    return json.dumps(value) if isinstance(value, str) else str(value)


@st.composite
def recipe(draw) -> str:
    lines = [f"method = {toml_value(draw(st.sampled_from(['nf4', 'fp4', 'int8', 'gptq', 'q4', 4])))}"]
    for key in draw(st.lists(st.sampled_from(RECIPE_KEYS), max_size=4, unique=True)):
        value = draw(st.one_of(HOSTILE_VALUES.filter(lambda v: v is not None), st.sampled_from([2, 3, 4, 8, 32, 64, 128, -1, "v1", "v2", "numpy", "*"])))
        lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


OUT_SHAPES = ["plain", "nested/missing", ".", "..", "src", "src/inside", "src/model.safetensors", "src/config.json",
              "link-to-folder", "link-to-src", "dangling-link", "file", "file/below", "glob[1]", "a?", "existing"]


def tree(source: Path) -> dict[str, str]:
    """The digest of every file of a source folder (or of the source file)."""
    files = sorted(source.rglob("*")) if source.is_dir() else [source]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def out_path(shape: str, root: Path, src: Path) -> Path:
    """An OUT of the given shape under `root` (building what the shape needs: links, files, an old OUT)."""
    if shape in ("link-to-folder", "link-to-src", "dangling-link"):
        target = {"link-to-folder": root / "real", "link-to-src": src, "dangling-link": root / "nowhere"}[shape]
        if shape == "link-to-folder":
            target.mkdir(exist_ok=True)
        (root / shape).symlink_to(target)
        return root / shape
    if shape in ("file", "file/below"):
        (root / "file").write_text("not a folder")
    if shape == "existing":
        (root / "existing").mkdir()
        (root / "existing" / "old.txt").write_text("old")
    return {"src": src, ".": root / ".", "..": root / "sub" / ".."}.get(shape, root / shape)


def leftovers_under(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*quantkit-*") if ".quantkit-" in p.name]


def check_output_run(root: Path, src: Path, out: Path, run: Callable[[], object]) -> None:
    """The promises: SRC untouched, no temporary file left, and a reported success verifies."""
    before = tree(src)
    try:
        run()
        written = True
    except QuantkitError:
        written = False
    assert tree(src) == before, f"the source changed writing {out}"
    assert not leftovers_under(root), f"left behind: {leftovers_under(root)}"
    if written:
        from quantkit.verify import verify

        assert verify(out, None, None).checks[0].ok, f"{out}: verify flags leftovers after a success"


def fresh_root(name: str) -> tuple[Path, Path]:
    root = WORK / name
    shutil.rmtree(root, ignore_errors=True)
    (root / "sub").mkdir(parents=True)
    return root, write_checkpoint(root / "src", tiny_tensors(hidden=32), config=dict(CONFIG, hidden_size=32, intermediate_size=32))


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

    slow = settings(max_examples=max(1, examples // 10), deadline=None, database=None, suppress_health_check=list(HealthCheck))
    config_root, config_src = fresh_root("config")

    @slow
    @given(hostile_config(), st.sampled_from(["gguf-F16", "gguf-Q4_K", "nf4", "int8", "gptq"]))
    def config_values(text: str, command: str) -> None:
        (config_src / "config.json").write_text(text)
        out = config_root / ("m.gguf" if command.startswith("gguf") else "q")
        if command.startswith("gguf"):
            run = lambda: pipeline.convert(str(config_src), out, "gguf", gguf_type=command[5:], force=True)  # noqa: E731
        else:
            run = lambda: pipeline.quantize(str(config_src), out, merge_options({}, {"method": command, "group_size": 32}), force=True)  # noqa: E731
        expect_quantkit_error(lambda: check_output_run(config_root, config_src, out, run))

    recipe_root, recipe_src = fresh_root("recipe")

    @slow
    @given(recipe())
    def recipes(text: str) -> None:
        path = write("r.toml", text.encode())

        def run() -> None:
            options = merge_options(load_recipe(path), {}, path)
            pipeline.quantize(str(recipe_src), recipe_root / "q", options, force=True)

        expect_quantkit_error(lambda: check_output_run(recipe_root, recipe_src, recipe_root / "q", run))

    @slow
    @given(st.sampled_from(OUT_SHAPES), st.sampled_from(["quantize", "convert-gguf", "convert-safetensors"]), st.booleans(),
           st.booleans())
    def output_paths(shape: str, command: str, force: bool, resume: bool) -> None:
        root, src = fresh_root("paths")
        out = out_path(shape, root, src)
        if command == "convert-gguf":
            out = out if shape in ("src/model.safetensors", "src/config.json", "file", "existing") else Path(str(out) + ".gguf")
            run = lambda: pipeline.convert(str(src), out, "gguf", force=force)  # noqa: E731
        elif command == "convert-safetensors":
            src = shutil.copy(seed_gguf, root / "sub" / "m.gguf")
            run = lambda: gguf_to_safetensors(src, out, force=force)  # noqa: E731
        else:
            run = lambda: pipeline.quantize(str(src), out, merge_options({}, {"method": "int8"}), force=force, resume=resume)  # noqa: E731
        expect_quantkit_error(lambda: check_output_run(root, src, out, run))

    seed_gguf = write("paths-seed.gguf", gguf_bytes)

    @settings(max_examples=max(1, examples // 50), deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate])  # shrinking would rerun processes for minutes
    @given(st.sampled_from(["quantize", "convert-gguf"]), st.integers(2, 3), st.floats(0, 0.5))
    def concurrent_runs(command: str, runs: int, stagger: float) -> None:
        """Several processes write the same OUT at once: none may crash, and what is left verifies."""
        root, src = fresh_root("concurrent")
        out = root / ("m.gguf" if command == "convert-gguf" else "out")
        args = ["convert", str(src), str(out), "--to", "gguf", "--force"] if command == "convert-gguf" else \
            ["quantize", str(src), str(out), "--method", "int8", "--force"]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        procs = []
        for _ in range(runs):
            procs.append(subprocess.Popen([sys.executable, "-m", "quantkit", *args], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True, env=env))
            time.sleep(stagger)
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        for code, stderr in results:
            assert code in (0, 2) and "Traceback" not in stderr, stderr
        assert any(code == 0 for code, _ in results), results
        assert not leftovers_under(root), leftovers_under(root)
        from quantkit.verify import verify

        assert verify(out, None, None).checks[0].ok

    return {"safetensors-bytes": safetensors_bytes, "safetensors-header": safetensors_header, "index": index,
            "gguf": gguf, "gguf-metadata": gguf_metadata, "torch-pickle": torch_pickle, "config-values": config_values,
            "recipes": recipes, "output-paths": output_paths, "concurrent-runs": concurrent_runs}  # fmt: skip


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
        print(f"{name:20s} {rounds:5d} rounds in {time.monotonic() - started:6.1f} s: "
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
