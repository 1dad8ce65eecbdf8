"""gpt-oss MXFP4 experts (quant_method "mxfp4": `*_blocks` / `*_scales`), read back to dense."""
