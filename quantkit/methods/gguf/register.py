"""What this folder adds to quantkit.api's registries (imported by quantkit.methods.load).

Every run loads the registries, so this file stays light: the GGUF modules (and gguf-py, ~0.1 s to import)
are imported when a GGUF file or target is actually met, not by a bitsandbytes or GPTQ run.
"""

from __future__ import annotations

from pathlib import Path

from quantkit import api
from quantkit.io.stream import Progress, no_progress


class ImatrixFormat:
    """llama.cpp's importance matrices (GGUF-based or legacy .dat): `inspect` describes one; registered
    before GGUFFormat, which would otherwise claim an imatrix named .gguf."""

    name = "imatrix"

    def detect(self, path: Path) -> bool:
        from quantkit.methods.gguf import imatrix  # numpy and the standard library only

        return path.is_file() and imatrix.is_imatrix(path)

    def inspect(self, path: Path) -> dict:
        from quantkit.methods.gguf import imatrix

        return imatrix.read_imatrix(path).describe()

    def verify(self, path: Path, reference: str | None, max_error: float | None) -> api.Report:
        from quantkit.errors import QuantkitError
        from quantkit.methods.gguf import imatrix

        try:
            found = imatrix.read_imatrix(path)
        except QuantkitError as e:
            return api.Report(str(path), [api.Check("structure", False, e.message)])
        return api.Report(str(path), [api.Check("structure", True, f"{len(found.weights)} finite importance "
                                                                   "vectors within the file")])

    def to_dense(self, src: str, path: Path, out: Path, dtype: str | None, force: bool, max_shard_size: int,
                 progress: Progress) -> api.Result:
        from quantkit.errors import QuantkitError

        raise QuantkitError(f"{src}: is an importance matrix, not a model",
                            "use it with: quantkit convert MODEL OUT.gguf --to gguf --imatrix " + str(src))


class GGUFFormat:
    name = "gguf"

    def detect(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".gguf"

    def inspect(self, path: Path) -> dict:
        from quantkit.methods.gguf import file  # imports gguf-py

        return file.inspect_file(path)

    def verify(self, path: Path, reference: str | None, max_error: float | None, progress: Progress = no_progress) -> api.Report:
        from quantkit.methods.gguf import verify  # imports gguf-py

        return verify.verify_gguf(path, reference, max_error, progress)

    def source(self, path: Path) -> api.TensorSource:
        from quantkit.methods.gguf import convert  # imports gguf-py

        return convert.gguf_source(path)

    def to_dense(self, src: str, path: Path, out: Path, dtype: str | None, force: bool, max_shard_size: int,
                 progress: Progress) -> api.Result:
        from quantkit.methods.gguf import convert  # imports gguf-py

        return convert.gguf_to_safetensors(path, out, dtype, force, max_shard_size, progress)

    def weights(self, path: Path) -> api.DenseWeights:
        from quantkit.methods.gguf import convert  # imports gguf-py

        return convert.from_gguf(path).weights()


def convert_to_gguf(request: api.ConvertRequest, progress: Progress) -> api.Result:
    from quantkit.methods.gguf import convert  # imports gguf-py

    return convert.convert_to_gguf(request, progress)


api.register_file_format(ImatrixFormat())
api.register_file_format(GGUFFormat())
def preview_gguf(request: api.ConvertRequest) -> api.Preview:
    from quantkit.methods.gguf import convert  # imports gguf-py

    return convert.preview_gguf(request)


def gguf_presets() -> dict[str, dict]:
    from quantkit.methods.gguf import convert  # imports gguf-py

    return convert.gguf_presets()


def describe_gguf() -> dict:
    from quantkit.methods.gguf import file, mixes, types  # imports gguf-py

    return {"reads": "safetensors folder (dense or quantized)", "writes": ".gguf file", "gguf_types": list(mixes.FILE_TYPES),
            "aliases": list(mixes.ALIASES), "tensor_types": list(types.GGUF_TYPES),
            "architectures": sorted(file.ARCHITECTURES),
            "back": "dequantize / convert --to safetensors (bfloat16 by default; every architecture but "
                    + ", ".join(sorted({a.gguf_arch for a in file.ARCHITECTURES.values() if not a.to_hf})) + ")"}


api.register_converter("gguf", convert_to_gguf, preview_gguf, gguf_presets, describe_gguf)
