"""Group-wise integers: GPTQ (v1 and v2 zero points) written and read, AWQ GEMM read, v1 <-> v2 converted."""
