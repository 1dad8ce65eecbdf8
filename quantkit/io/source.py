"""Where a checkpoint comes from: a local folder or a hub repo id; which shards it has, validated.

Nothing here reads tensor data: config.json, the index and the safetensors headers only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.io.safetensors import INDEX_NAME, SINGLE_NAME, TensorInfo, read_header

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
WEIGHT_INDEXES = (INDEX_NAME, "pytorch_model.bin.index.json")
# What a hub download brings: config, weights' index and shards, tokenizer and small side files.
HUB_PATTERNS = [
    "config.json", "*.safetensors", INDEX_NAME, "generation_config.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab*", "merges.txt", "*.model", "chat_template*", "preprocessor_config.json",
]  # fmt: skip


def architectures(config: dict) -> list[str]:
    """config.json's `architectures` as the list of class names it should be: a bare string is one name,
    anything that is not a string is ignored (so no message spells a name letter by letter)."""
    names = config.get("architectures")
    if isinstance(names, str):
        return [names]
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


@dataclass
class Checkpoint:
    """A safetensors checkpoint folder as read from its config and headers."""

    root: Path
    config: dict
    files: list[Path]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def quantization_config(self) -> dict | None:
        qc = self.config.get("quantization_config")
        return qc if isinstance(qc, dict) else None

    @property
    def architecture(self) -> str:
        archs = architectures(self.config)
        return archs[0] if archs else str(self.config.get("model_type", "unknown"))

    @property
    def name(self) -> str:
        """The model's name: the folder's, or the repo's for a Hugging Face cache snapshot
        (`models--org--name/snapshots/<revision>`), whose folder is named by a commit hash."""
        root = self.root.resolve()
        if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
            return root.parent.parent.name.split("--", 2)[-1]
        return root.name

    def side_files(self) -> list[Path]:
        """Files other than weights and config.json (tokenizer, generation config, ...), relative to root."""
        found = []
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root)
            if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                continue
            if rel.name == "config.json" and len(rel.parts) == 1:
                continue
            if rel.suffix in WEIGHT_SUFFIXES or rel.name in WEIGHT_INDEXES:
                continue
            found.append(rel)
        return found


def resolve(src: str, revision: str | None = None, patterns: list[str] = HUB_PATTERNS) -> Path:
    """A local path as is; a hub repo id downloaded (or found in the cache) with huggingface_hub:
    the files `patterns` match (`.bin` weights only when converting them)."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    if not HUB_ID.match(src):
        raise QuantkitError(f"{src}: no such file or folder")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - a declared dependency
        raise QuantkitError(f"{src}: not a local path, and huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(src, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantkitError(f"{src}: not a local path and not available from the hub ({first_line})") from None


def read_config(root: Path) -> dict:
    path = root / "config.json"
    if not path.is_file():
        raise QuantkitError(f"{path}: missing", "a checkpoint folder needs its config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise QuantkitError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise QuantkitError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(config, dict):
        raise QuantkitError(f"{path}: must hold a JSON object")
    qc = config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise QuantkitError(f"{path}: quantization_config must be an object")
    for key, (ok, expected) in _GENERAL_KEYS.items():
        if config.get(key) is not None and not ok(config[key]):
            raise QuantkitError(f"{path}: {key} = {str(config[key])[:60]} is not {expected}")
    return config


# Keys every command may read, with the type transformers writes (null is allowed: "not set"); the numbers a
# format needs are checked by that format (GGUF: methods/gguf/file.py's Hyper).
_GENERAL_KEYS = {
    "model_type": (lambda v: isinstance(v, str), "a string"),
    "architectures": (lambda v: isinstance(v, str) or isinstance(v, list) and all(isinstance(a, str) for a in v),
                      "a list of class names"),  # a bare string: one name
    "tie_word_embeddings": (lambda v: isinstance(v, bool), "true or false"),
    "dtype": (lambda v: isinstance(v, str), "a dtype name"),
    "torch_dtype": (lambda v: isinstance(v, str), "a dtype name"),
}


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise QuantkitError(f"duplicate key '{key}'")
        seen[key] = value
    return seen


def inside(root: Path, name: str, what: str) -> Path:
    """`root/name` for a name an index gives: a plain relative name, refused when it would leave root
    (absolute path, '..') or cannot be a file (NUL, a symlink loop). What matters is that the *name* lies
    inside the folder: a file there may be a symlink to anywhere (the Hugging Face cache stores every
    snapshot file as a link into `../../blobs/`); the folder's owner put it there, an index only chooses
    among the folder's names."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise QuantkitError(f"{what}: path {name!r} is not a file name")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise QuantkitError(f"{what}: path {name!r} leaves the checkpoint folder")
    try:
        (root / name).resolve()
    except RuntimeError:  # pathlib's word for a symlink loop
        raise QuantkitError(f"{what}: path {name!r} is a symlink loop") from None
    return root / name


def is_file(path: Path, what: str) -> bool:
    try:
        return path.is_file()
    except OSError as e:  # a name too long, say
        raise QuantkitError(f"{what}: cannot open {str(path)[:200]!r} ({e.strerror})") from None


def read_index(root: Path, index_name: str = INDEX_NAME) -> dict[str, str]:
    """The index's weight_map, validated: shard paths stay inside root and exist."""
    path = root / index_name
    try:
        index = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except QuantkitError as e:
        raise QuantkitError(f"{path}: {e.message}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise QuantkitError(f"{path}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise QuantkitError(f"{path}: weight_map must map tensor names to shard file names")
    for name, shard in weight_map.items():
        where = f"{path}: tensor '{name}'"
        if not is_file(inside(root, shard, where), where):
            raise QuantkitError(f"{path}: tensor '{name}' points at missing shard '{shard}'")
    return weight_map


def open_checkpoint(root: Path) -> Checkpoint:
    """Read a safetensors checkpoint folder: config, shard list, every header; validated, no data."""
    if not root.is_dir():
        raise QuantkitError(f"{root}: not a checkpoint folder")
    config = read_config(root)
    if (root / INDEX_NAME).is_file():
        weight_map = read_index(root)
        files = [root / name for name in dict.fromkeys(weight_map.values())]
    elif (root / SINGLE_NAME).is_file():
        weight_map, files = None, [root / SINGLE_NAME]
    else:
        files = sorted(p for p in root.glob("*.safetensors") if p.is_file())
        weight_map = None
        if not files:
            legacy = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            hint = "convert it first: quantkit convert SRC OUT --to safetensors" if legacy else None
            raise QuantkitError(f"{root}: no safetensors weights found", hint)
    checkpoint = Checkpoint(root=root, config=config, files=files)
    for file in files:
        tensors, _ = read_header(file)
        for name, info in tensors.items():
            if name in checkpoint.tensors:
                raise QuantkitError(f"{file}: tensor '{name}' also appears in {checkpoint.tensors[name].file.name}")
            if weight_map is not None and weight_map.get(name) != file.name:
                raise QuantkitError(f"{root / INDEX_NAME}: tensor '{name}' in {file.name} is not listed there")
            checkpoint.tensors[name] = info
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in checkpoint.tensors:
                raise QuantkitError(f"{root / INDEX_NAME}: tensor '{name}' is not in {shard}")
    return checkpoint
