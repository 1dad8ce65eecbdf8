"""Legacy PyTorch `.bin` / `.pt` checkpoints: inspected inertly, converted to safetensors."""
