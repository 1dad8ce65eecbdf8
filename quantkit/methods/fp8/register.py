"""What this folder adds to quantkit.api's registries (imported by quantkit.methods.load)."""

from quantkit import api
from quantkit.methods.fp8.quantizer import Fp8Fine
from quantkit.methods.fp8.reader import Fp8Reader

api.register(Fp8Fine())
api.register_dequantizer(Fp8Reader())
