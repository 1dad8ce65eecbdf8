"""`convert --to gptq-v1|gptq-v2`: the same integers with the other zero-point convention."""

from __future__ import annotations

from pathlib import Path

from quantkit.api import ConvertRequest, Result
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import OutputTensor, ShardReader
from quantkit.io.source import open_checkpoint, resolve
from quantkit.io.staged import bytes_on_disk, check_free_space, check_output, copy_side_files, write_config, write_staged
from quantkit.io.stream import Entry, Progress, copy_tensor, ordered, stream_entries
from quantkit.methods.gptq.layout import convert_qzeros, rewrite_quantize_config, with_version
from quantkit.methods.gptq.reader import GptqReader, checkpoint_config, read_tensor


def convert_version(request: ConvertRequest, version: str, progress: Progress) -> Result:
    """`convert --to gptq-v1|gptq-v2`: rewrite every `qzeros` and the declared format, copy the rest as is.

    Every zero point is checked (one small tensor at a time) before anything is written, so a v2
    checkpoint holding a zero point of 0 is refused up front, naming the module.
    """
    out = request.out
    checkpoint = open_checkpoint(resolve(request.src, request.revision))
    config = checkpoint_config(checkpoint)
    if config.method != "gptq":
        raise QuantkitError(f"{checkpoint.root}: --to gptq-{version} converts GPTQ checkpoints, this one is {config.method}")
    modules = GptqReader().modules(checkpoint)
    for module in modules:
        qzeros = f"{module}.qzeros"
        if qzeros in checkpoint.tensors:
            convert_qzeros(read_tensor(checkpoint, qzeros), config.bits, config.version, version, module)
    rewritten = {f"{module}.qzeros": module for module in modules}
    entries = ordered(checkpoint, [
        Entry(name, "rewrite" if name in rewritten else "keep", outputs=(OutputTensor(name, info.dtype, info.shape),))
        for name, info in checkpoint.tensors.items()
    ])  # fmt: skip
    check_output(checkpoint.root, out, request.force)
    check_free_space(out, sum(info.nbytes for info in checkpoint.tensors.values()))

    def handle(reader: ShardReader, entry: Entry, info, writer) -> None:
        if entry.fate == "keep":
            copy_tensor(reader, info, entry.source, writer)
            return
        module = rewritten[entry.source]
        writer.write(entry.source, convert_qzeros(reader.read(info), config.bits, config.version, version, module))
        writer.done(entry.source)

    def finish(folder: Path) -> list[str]:
        declared = with_version(checkpoint.quantization_config, version)
        write_config(folder, dict(checkpoint.config, quantization_config=declared))
        side = copy_side_files(checkpoint, folder)
        rewrite_quantize_config(folder / "quantize_config.json", version)
        return side

    fill = lambda writer: stream_entries(checkpoint, entries, writer, handle, progress)  # noqa: E731
    files, _ = write_staged(out, [o for e in entries for o in e.outputs], request.max_shard_size, fill, finish,
                            force=request.force)
    return Result(out, files, {"to": f"gptq-{version}", "from": f"gptq-{config.version}", "modules": len(modules),
                               "tensors": len(entries), "output_bytes": bytes_on_disk(out, files),
                               "fallbacks": [], "warnings": []})

