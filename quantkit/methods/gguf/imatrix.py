"""Readers for llama.cpp importance-matrix files, giving the per-column weights llama-quantize uses.

Spec (llama.cpp in llama-cpp-python 0.3.36, reimplemented): common/imatrix-loader.cpp
(`common_imatrix_load`, `common_imatrix_load_legacy`), tools/quantize/quantize.cpp (`load_imatrix`),
tools/imatrix/imatrix.cpp (`save_imatrix`, `save_imatrix_legacy`).

GGUF format (what `llama-imatrix` writes by default): metadata `general.type = "imatrix"`,
`imatrix.datasets` (array of strings), `imatrix.chunk_count` (u32), `imatrix.chunk_size` (u32); per
weight two F32 tensors `<name>.in_sum2` (ne = [n_per_row, n_mat]) and `<name>.counts` (ne = [1, n_mat]),
n_mat = number of experts (1 for dense). llama-quantize refuses the file unless all three metadata keys
exist. Weights: counts are rounded with lround, then for each expert j
`w[j*ne0 + i] = in_sum2[j*ne0 + i] / (float)count[j]`, or 1.0 where count[j] <= 0.

Legacy `.dat`: int32 n_entries (>= 1); per entry int32 name length, the name (cut at a NUL), int32 ncall,
int32 nval (>= 1), nval float32 (already (sum / count) * ncall); then optionally int32 chunk count and an
int32-length dataset name. Weights: `sums / (float)ncall` when ncall > 0, else the sums as stored.

llama-quantize also refuses non-finite weights; so do these readers. All lengths, counts and offsets
are checked against the file size before anything is allocated; every problem is a QuantkitError naming
the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantkit.errors import QuantkitError

GGUF_MAGIC = b"GGUF"
KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
T_STRING, T_ARRAY, T_U32 = 8, 9, 4
GGML_F32 = 0
MAX_DIMS = 4
MAX_NAME = 63          # GGML_MAX_NAME - 1


@dataclass
class Imatrix:
    path: Path
    format: str                                           # "gguf" or "legacy"
    weights: dict[str, np.ndarray]                        # tensor name -> float32 [n_mat * n_per_row]
    experts: dict[str, int]                               # tensor name -> n_mat
    counts: dict[str, np.ndarray]                         # tensor name -> int64 counts (legacy: [ncall])
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def describe(self) -> dict:
        """What `inspect` shows: the entries (one per weight matrix) with their sizes and call counts."""
        names = sorted(self.weights)
        return {
            "path": str(self.path), "format": f"imatrix, {'GGUF' if self.format == 'gguf' else 'legacy .dat'}",
            "num_parameters": sum(int(w.size) for w in self.weights.values()), "bytes": self.path.stat().st_size,
            "dtypes": {"F32": len(names)}, "quantization": None,
            "note": f"importance matrix of {len(names)} weights from {self.chunk_count} chunks"
                    + (f" of {self.chunk_size} tokens" if self.chunk_size else "")
                    + (f" of {', '.join(self.datasets)}" if self.datasets else "")
                    + "; use it with convert --to gguf --imatrix",
            "entries": len(names), "chunk_count": self.chunk_count, "chunk_size": self.chunk_size,
            "datasets": self.datasets,
            "tensors": [{"name": n, "dtype": "F32", "shape": [self.experts[n], self.weights[n].size // self.experts[n]],
                         "min_count": int(self.counts[n].min()), "max_count": int(self.counts[n].max())}
                        for n in names],
        }


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> QuantkitError:
        return QuantkitError(f"{self.path}: {what} (at byte {self.pos} of {len(self.buf)})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > len(self.buf) - self.pos:
            raise self.fail(f"truncated or bad length reading {what} ({n} bytes wanted)")
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return b

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what + " length")
        return self.take(n, what).decode("utf-8", errors="replace")


def _f32_at(buf, offset: int, count: int) -> np.ndarray:
    return np.frombuffer(buf, dtype="<f4", count=count, offset=offset).astype(np.float32)


def _lround(v: np.ndarray) -> np.ndarray:
    """C lround on float32 values (half away from zero); the caller has checked they are finite."""
    v = v.astype(np.float64)
    return (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int64)


def _check_finite(path: Path, name: str, w: np.ndarray) -> None:
    if not np.isfinite(w).all():
        raise QuantkitError(f"{path}: imatrix contains a non-finite value for {name}")


def _read_metadata(c: _Cursor) -> tuple[int, dict[str, tuple[int, object]]]:
    """The GGUF header up to the tensor infos -> (tensor count, {key: (value type, value)})."""
    buf = c.buf
    c.take(4, "magic")
    version = c.unpack("<I", "version")
    if version not in (2, 3):
        raise c.fail(f"unsupported GGUF version {version}")
    n_tensors = c.unpack("<Q", "tensor count")
    n_kv = c.unpack("<Q", "metadata count")
    if n_tensors > len(buf) // 24 or n_kv > len(buf) // 12:        # smallest tensor info / kv entry
        raise c.fail(f"tensor count {n_tensors} or metadata count {n_kv} does not fit the file")
    kv: dict[str, tuple[int, object]] = {}
    for _ in range(n_kv):
        key = c.string("metadata key")
        vtype = c.unpack("<I", f"type of {key}")
        if vtype in _SCALAR:
            value = c.unpack(_SCALAR[vtype], key)
        elif vtype == T_STRING:
            value = c.string(key)
        elif vtype == T_ARRAY:
            etype, n = c.unpack("<I", f"{key} element type"), c.unpack("<Q", f"{key} length")
            if etype == T_STRING:
                if n > (len(buf) - c.pos) // 8:
                    raise c.fail(f"array {key} of {n} strings does not fit the file")
                value = (etype, [c.string(f"{key}[{i}]") for i in range(n)])
            elif etype in _SCALAR:
                c.take(n * struct.calcsize(_SCALAR[etype]), key)
                value = (etype, None)
            else:
                raise c.fail(f"array {key} has unsupported element type {etype}")
        else:
            raise c.fail(f"metadata {key} has unknown type {vtype}")
        if key in kv:
            raise c.fail(f"duplicate metadata key {key}")
        kv[key] = (vtype, value)
    return n_tensors, kv


def _read_gguf(buf, path: Path) -> Imatrix:
    c = _Cursor(buf, path)
    n_tensors, kv = _read_metadata(c)
    align = 32
    if "general.alignment" in kv:
        t, a = kv["general.alignment"]
        if t != T_U32 or a == 0 or a & (a - 1):
            raise c.fail("general.alignment must be a u32 power of two")
        align = a
    infos = []
    for _ in range(n_tensors):
        name = c.string("tensor name")
        n_dims = c.unpack("<I", f"dims of {name}")
        if n_dims > MAX_DIMS:
            raise c.fail(f"tensor {name} has {n_dims} dims")
        ne = [c.unpack("<Q", f"shape of {name}") for _ in range(n_dims)]
        ttype, offset = c.unpack("<I", f"type of {name}"), c.unpack("<Q", f"offset of {name}")
        infos.append((name, ne, ttype, offset))
    data_start = -(-c.pos // align) * align
    if len({i[0] for i in infos}) != len(infos):
        raise c.fail("duplicate tensor names")

    for key in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
        if key not in kv:
            raise QuantkitError(f"{path}: missing imatrix metadata {key} (llama-quantize refuses this file)")
    for key in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
        if kv[key][0] != T_U32:
            raise QuantkitError(f"{path}: {key} must be a u32")
    t, ds = kv[KEY_DATASETS]
    datasets = ds[1] if t == T_ARRAY and ds[0] == T_STRING else []

    pairs: dict[str, list] = {}
    for name, ne, ttype, offset in infos:
        for suffix, slot in ((".in_sum2", 0), (".counts", 1)):
            if name.endswith(suffix) and len(name) > len(suffix):
                pairs.setdefault(name[:-len(suffix)], [None, None])[slot] = (name, ne, ttype, offset)
    if not infos:
        raise QuantkitError(f"{path}: no data (0 tensors)")

    def load(info) -> np.ndarray:
        name, ne, ttype, offset = info
        if ttype != GGML_F32:
            raise QuantkitError(f"{path}: {name} must be F32 (type {ttype})")
        count = 1
        for d in ne:
            count *= d
        start = data_start + offset
        if count * 4 > len(buf) or start + count * 4 > len(buf):
            raise QuantkitError(f"{path}: data of {name} ({count} floats at {start}) lies outside the file")
        return _f32_at(buf, start, count)

    weights, experts, counts = {}, {}, {}
    for base, (s, k) in sorted(pairs.items()):
        if s is None or k is None:
            raise QuantkitError(f"{path}: mismatched sums and counts for {base}")
        sums, cnt = load(s), load(k)
        if cnt.size == 0 or sums.size % cnt.size:
            raise QuantkitError(f"{path}: {base} has {sums.size} sums for {cnt.size} counts")
        if not np.isfinite(cnt).all() or np.abs(cnt).max() >= 2.0 ** 62:
            raise QuantkitError(f"{path}: {base} has non-finite or out-of-range counts")
        n = _lround(cnt)
        ne0 = sums.size // cnt.size
        with np.errstate(all="ignore"):
            per = sums.reshape(cnt.size, ne0) / n.astype(np.float32)[:, None]
        w = np.where((n > 0)[:, None], per, np.float32(1)).astype(np.float32).reshape(-1)
        _check_finite(path, base, w)
        weights[base], experts[base], counts[base] = w, int(cnt.size), n
    return Imatrix(path, "gguf", weights, experts, counts, datasets,
                   int(kv[KEY_CHUNK_COUNT][1]), int(kv[KEY_CHUNK_SIZE][1]))


def _read_legacy(buf, path: Path) -> Imatrix:
    c = _Cursor(buf, path)
    n_entries = c.unpack("<i", "entry count")
    if n_entries < 1:
        raise c.fail(f"no data (entry count {n_entries})")
    if n_entries > len(buf) // 16:
        raise c.fail(f"entry count {n_entries} does not fit the file")
    weights, experts, counts = {}, {}, {}
    for i in range(n_entries):
        n = c.unpack("<i", f"name length of entry {i + 1}")
        name = c.take(n, f"name of entry {i + 1}").split(b"\0", 1)[0].decode("utf-8", errors="replace")
        ncall = c.unpack("<i", f"ncall of {name}")
        nval = c.unpack("<i", f"value count of {name}")
        if nval < 1:
            raise c.fail(f"bad value count {nval} for {name}")
        start = c.pos
        if nval > (len(buf) - start) // 4:
            raise c.fail(f"{nval} values of {name} do not fit the file")
        c.pos += 4 * nval
        sums = _f32_at(buf, start, nval)
        with np.errstate(all="ignore"):
            w = sums / np.float32(ncall) if ncall > 0 else sums
        _check_finite(path, name, w)
        weights[name], experts[name], counts[name] = w.astype(np.float32), 1, np.array([ncall], np.int64)
    chunk_count, datasets = 0, []
    if len(buf) - c.pos >= 4:                              # optional trailer; a short one is ignored
        chunk_count = c.unpack("<i", "chunk count")
        if len(buf) - c.pos >= 4:
            n = c.unpack("<i", "dataset length")
            if 0 < n <= len(buf) - c.pos:
                datasets.append(c.take(n, "dataset").split(b"\0", 1)[0].decode("utf-8", errors="replace"))
    return Imatrix(path, "legacy", weights, experts, counts, datasets, chunk_count, 0)


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read a GGUF (magic "GGUF") or legacy .dat importance matrix."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 4:
                raise QuantkitError(f"{path}: too small for an imatrix file ({size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                buf = memoryview(mm)
                try:
                    im = (_read_gguf if bytes(buf[:4]) == GGUF_MAGIC else _read_legacy)(buf, path)
                    im.weights = {k: v.copy() for k, v in im.weights.items()}   # detach from the map
                    return im
                finally:
                    buf.release()
    except OSError as e:
        raise QuantkitError(f"{path}: {e.strerror or e}") from None


def weights_for(im: Imatrix, name: str, n_per_row: int, n_expert: int = 1) -> np.ndarray | None:
    """The weights llama-quantize hands to quantize_* for tensor `name` ([n_expert, n_per_row]), None if
    absent; a size mismatch is an error as in llama-quantize (which lets token_embd through unweighted)."""
    w = im.weights.get(name)
    if w is None:
        return None
    if w.size != n_per_row * n_expert:
        if name in ("token_embd.weight", "per_layer_token_embd.weight"):
            return None
        raise QuantkitError(f"{im.path}: imatrix size {w.size} is different from tensor size "
                           f"{n_per_row * n_expert} for {name}")
    return w.reshape(n_expert, n_per_row)


def is_imatrix(path: Path) -> bool:
    """A legacy .dat / .imatrix file by its name, or a GGUF whose metadata holds imatrix.* keys."""
    if path.suffix in (".dat", ".imatrix"):
        return True
    if path.suffix != ".gguf":
        return False
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                return bytes(buf[:4]) == GGUF_MAGIC and KEY_CHUNK_COUNT in _read_metadata(_Cursor(buf, path))[1]
            finally:
                buf.release()
    except (OSError, ValueError, QuantkitError):
        return False
