"""What this folder adds to quantkit.api's registries (imported by quantkit.methods.load)."""

from quantkit import api
from quantkit.methods.gptq.quantizer import Gptq
from quantkit.methods.gptq.reader import AwqReader, GptqReader
from quantkit.methods.gptq.versions import convert_version

api.register(Gptq())
api.register_dequantizer(GptqReader())
api.register_dequantizer(AwqReader())
for _version in ("v1", "v2"):
    api.register_converter(f"gptq-{_version}", lambda request, progress, version=_version: convert_version(request, version, progress),
                           describe=lambda version=_version: {"reads": "GPTQ folder", "writes": f"GPTQ folder, {version} zero points"})
