"""Small random checkpoints with a real (freshly trained) byte-level BPE tokenizer, for the GGUF tests."""

from __future__ import annotations

from pathlib import Path

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
    "def main(argv):\n    return sum(int(a) for a in argv[1:]) * 42\n"
    "In 1969, 12 astronauts' footprints: they're here, we'll see, I'd say it's fine.\n"
) * 20

CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
           "phi3": "Phi3ForCausalLM"}
CONFIGS = {"gemma3": "Gemma3TextConfig"}  # where the config class is not the model class's *Config


def train_tokenizer(out: Path, vocab_size: int = 320) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    fast.save_pretrained(out)


def make_checkpoint(out: Path, family: str = "llama", hidden: int = 256, ffn: int = 512, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, vocab: int = 320, seed: int = 0, tied: bool = False,
                    dtype: str = "float32", random_norms: bool = False, **config_extra) -> Path:
    """A random *ForCausalLM saved as safetensors (in `dtype`), with tokenizer files beside it.
    `random_norms`: norm weights drawn too (gemma's start at zero, which would hide its +1)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = getattr(transformers, CLASSES[family])
    config = getattr(transformers, CONFIGS.get(family, CLASSES[family].replace("ForCausalLM", "Config")))(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, **config_extra)
    model = cls(config).eval()
    name_of = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():  # random init is tiny; give the weights a spread that exercises the quantizers
        for p in model.parameters():
            if p.ndim == 2 or "proj.bias" in name_of[id(p)]:
                p.normal_(0, 0.05)
            elif random_norms and "norm" in name_of[id(p)]:
                p.uniform_(-0.5, 0.5)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    train_tokenizer(out, vocab)
    return Path(out)


def train_sentencepiece(out: Path, vocab_size: int = 300) -> None:
    """A llama-style sentencepiece tokenizer.model (BPE, byte fallback) in place of tokenizer.json."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.splitlines() * 5), model_writer=model,
                                   vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
                                   bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).unlink(missing_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def use_llama3_pre_tokenizer(folder: Path) -> None:
    """Give the checkpoint's tokenizer.json Llama 3's pre-tokenizer (a regex Split, then bytes)."""
    import json

    path = folder / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    path.write_text(json.dumps(tok))


# The architectures beside llama / mistral / qwen2, each as a small random bf16 model whose widths do not
# hold 256-blocks (hidden 320, ffn 576), with the settings llama.cpp must carry over: qwen3's q/k norms and a
# head_dim other than hidden / heads; gemma2's sandwich norms, soft-capping and a sliding window shorter than
# the test texts; gemma3's q/k norms, per-layer-type rope (linear scaling on full attention, its own base on
# sliding layers) and one full layer in six; phi3's fused qkv / gate_up and partial rotary embeddings.
ARCH_MODELS = {
    "qwen3": dict(head_dim=64),
    "gemma2": dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=8, tied=True),
    "gemma3": dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=8, tied=True, layers=6,
                   final_logit_softcapping=30.0,
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "phi3": dict(partial_rotary_factor=0.75, original_max_position_embeddings=256, pad_token_id=1),
}


def make_arch_checkpoint(out: Path, family: str, **changes) -> Path:
    """ARCH_MODELS[family] (with `changes`) as a bf16 checkpoint with random norms."""
    spec = dict(hidden=320, ffn=576, heads=4, kv_heads=2, dtype="bfloat16", random_norms=True, seed=1)
    return make_checkpoint(out, family, **{**spec, **ARCH_MODELS[family], **changes})
