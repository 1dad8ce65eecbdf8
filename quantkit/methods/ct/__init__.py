"""compressed-tensors (quant_method "compressed-tensors", what vLLM serves): the llm-compressor presets written
byte for byte as model_free_ptq writes them, and every compressed-tensors weight format read back."""
