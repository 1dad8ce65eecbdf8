"""What this folder adds to quantkit.api's registries (imported by quantkit.methods.load)."""

from quantkit import api
from quantkit.methods.bnb.quantizer import BitsAndBytes
from quantkit.methods.bnb.reader import BitsAndBytesReader

api.register(BitsAndBytes())
api.register_dequantizer(BitsAndBytesReader())
