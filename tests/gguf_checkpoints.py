"""Small random checkpoints with a real (freshly trained) byte-level BPE tokenizer, for the GGUF tests."""

from __future__ import annotations

from pathlib import Path

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
    "def main(argv):\n    return sum(int(a) for a in argv[1:]) * 42\n"
    "In 1969, 12 astronauts' footprints: they're here, we'll see, I'd say it's fine.\n"
) * 20

CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


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
                    heads: int = 4, kv_heads: int = 2, vocab: int = 320, seed: int = 0, tied: bool = False, **config_extra) -> Path:
    """A random *ForCausalLM in float32 saved as safetensors, with tokenizer files beside it."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = getattr(transformers, CLASSES[family])
    config = getattr(transformers, CLASSES[family].replace("ForCausalLM", "Config"))(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, **config_extra)
    model = cls(config).eval()
    name_of = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():  # random init is tiny; give the weights a spread that exercises the quantizers
        for p in model.parameters():
            if p.ndim == 2 or "proj.bias" in name_of[id(p)]:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
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
