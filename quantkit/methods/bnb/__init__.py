"""bitsandbytes NF4 / FP4 (4-bit, double quantization) and LLM.int8: writing and reading them."""
