"""quantkit: convert LLM checkpoints between full precision and quantized formats."""

__version__ = "0.1.0"
