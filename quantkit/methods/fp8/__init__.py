"""Fine-grained FP8 (quant_method "fp8": DeepSeek-V3 / Qwen3-FP8 style 128x128 blocks, `weight_scale_inv`)."""
