"""What this folder adds to quantkit.api's registries (imported by quantkit.methods.load)."""

from __future__ import annotations

from pathlib import Path

from quantkit import api
from quantkit.errors import QuantkitError
from quantkit.io.stream import Progress
from quantkit.io.torchpickle import is_torch_checkpoint
from quantkit.methods.torchbin.convert import convert, inspect


class TorchFormat:
    """A PyTorch pickle checkpoint (a file, or a folder of them without safetensors)."""

    name = "pytorch"

    def detect(self, path: Path) -> bool:
        return is_torch_checkpoint(path)

    def inspect(self, path: Path) -> dict:
        return inspect(path)

    def verify(self, path: Path, reference: str | None, max_error: float | None, progress=None) -> None:
        return None  # verify's folder checks report that there are no safetensors

    def to_dense(self, src: str, path: Path, out: Path, dtype: str | None, force: bool, max_shard_size: int,
                 progress: Progress) -> api.Result:
        return convert(src, out, dtype, force, None, max_shard_size, progress)

    def weights(self, path: Path) -> api.DenseWeights:
        raise QuantkitError(f"{path}: PyTorch pickles are not read in place",
                                "convert it first: quantkit convert SRC OUT --to safetensors")


api.register_file_format(TorchFormat())
