"""quantkit: convert LLM checkpoints between full precision and quantized formats.

The Python API (quantkit.commands, imported on first use so that `import quantkit` stays cheap):
`quantize`, `dequantize`, `convert`, `verify`, `inspect`, `formats`; errors raise `QuantkitError`.
"""

__version__ = "0.1.0"
__all__ = ["QuantkitError", "convert", "dequantize", "formats", "inspect", "quantize", "verify"]

_COMMANDS = ("convert", "dequantize", "formats", "inspect", "quantize", "verify")


def __getattr__(name: str):
    """PEP 562: the commands load on first use (every module imports this package; it imports nothing)."""
    if name in _COMMANDS:
        import importlib

        return getattr(importlib.import_module("quantkit.commands"), name)
    if name == "QuantkitError":
        from quantkit.errors import QuantkitError

        return QuantkitError
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")
