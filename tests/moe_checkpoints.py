"""Small random mixture-of-experts checkpoints (mixtral, qwen2_moe, qwen3_moe) saved by transformers in
bfloat16, per-expert tensors as on the Hub, with a trained byte-level BPE tokenizer, for the GGUF tests."""

from __future__ import annotations

from pathlib import Path

from tests.gguf_checkpoints import train_tokenizer

# 4 experts, 2 used; hidden 256 (K-quant rows), expert widths 160 and 352 (rows that do not hold 256-blocks)
FAMILIES = {
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", {"num_local_experts": 4, "intermediate_size": 160}),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", {
        "num_experts": 4, "intermediate_size": 352, "moe_intermediate_size": 160,
        "shared_expert_intermediate_size": 352}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", {
        "num_experts": 4, "intermediate_size": 352, "moe_intermediate_size": 160, "head_dim": 48,
        "norm_topk_prob": True}),
}


def make_moe_checkpoint(out: Path, family: str, seed: int = 0, layers: int = 2, vocab: int = 320,
                        max_shard_size: str = "50MB", **config_extra) -> Path:
    """A random *ForCausalLM of `family` saved in bfloat16 as transformers writes it."""
    import torch
    import transformers

    model_class, config_class, sizes = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(
        hidden_size=256, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5, num_experts_per_tok=2,
        bos_token_id=0, eos_token_id=1, **({"tie_word_embeddings": False} | sizes | config_extra))
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # random init is tiny; give the weights a spread that exercises the quantizers
        for name, p in model.named_parameters():
            if p.ndim >= 2 or "proj.bias" in name:
                p.normal_(0, 0.05)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size=max_shard_size)
    train_tokenizer(out, vocab)
    return Path(out)
