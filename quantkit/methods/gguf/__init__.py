"""GGUF (llama.cpp): safetensors -> GGUF with the types in types.py, GGUF -> safetensors, inspect and verify
of .gguf files."""
