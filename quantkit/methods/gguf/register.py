"""What this folder adds to quantkit.api's registries (imported by quantkit.methods.load).

Every run loads the registries, so this file stays light: the GGUF modules (and gguf-py, ~0.1 s to import)
are imported when a GGUF file or target is actually met, not by a bitsandbytes or GPTQ run.
"""

from __future__ import annotations

from pathlib import Path

from quantkit import api
from quantkit.io.stream import Progress


class GGUFFormat:
    name = "gguf"

    def detect(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".gguf"

    def inspect(self, path: Path) -> dict:
        from quantkit.methods.gguf import file  # imports gguf-py

        return file.inspect_file(path)

    def verify(self, path: Path, reference: str | None, max_error: float | None) -> api.Report:
        from quantkit.methods.gguf import verify  # imports gguf-py

        return verify.verify_gguf(path, reference, max_error)

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


api.register_file_format(GGUFFormat())
api.register_converter("gguf", convert_to_gguf)
