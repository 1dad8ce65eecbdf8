"""What this folder adds to quantkit.api's registries (imported by quantkit.methods.load)."""

from quantkit import api
from quantkit.methods.mxfp4.reader import Mxfp4Reader

api.register_dequantizer(Mxfp4Reader())
