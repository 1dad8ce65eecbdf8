"""What this folder adds to quantkit.api's registries (imported by quantkit.methods.load)."""

from quantkit import api
from quantkit.methods.gptq.quantizer import Gptq
from quantkit.methods.gptq.reader import AwqReader, GptqReader
from quantkit.methods.gptq.versions import convert_version

api.register(Gptq())
api.register_dequantizer(GptqReader())
api.register_dequantizer(AwqReader())
api.register_converter("gptq-v1", lambda request, progress: convert_version(request, "v1", progress))
api.register_converter("gptq-v2", lambda request, progress: convert_version(request, "v2", progress))
