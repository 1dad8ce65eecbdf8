"""What this folder adds to quantkit.api's registries (imported by quantkit.methods.load)."""

from quantkit import api
from quantkit.methods.ct.quantizer import CompressedTensors
from quantkit.methods.ct.reader import CompressedTensorsReader

api.register(CompressedTensors())
api.register_dequantizer(CompressedTensorsReader())
