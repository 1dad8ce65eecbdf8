"""Tokenizers in GGUF (`tokenizer.ggml.*`) both ways.

HF -> GGUF: a byte-level BPE `tokenizer.json` becomes llama.cpp's "gpt2" vocab (tokens, types, merges,
pre-tokenizer name), a sentencepiece `tokenizer.model` its "llama" vocab (read with the optional
`sentencepiece` package). Special token ids and the chat template come along.
GGUF -> HF: a "gpt2" vocab becomes tokenizer.json again; every vocab gives tokenizer_config.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, Keys, TokenType

from quantkit.errors import QuantkitError

# Pre-tokenizer regexes as tokenizer.json spells them -> llama.cpp's name for that pre-tokenizer.
_SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}  # fmt: skip
_PATTERN_OF = {name: pattern for pattern, name in _SPLIT_PATTERNS.items()}
_SPECIALS = ("bos", "eos", "unk", "pad")
SPECIAL_KEYS = {"bos": Keys.Tokenizer.BOS_ID, "eos": Keys.Tokenizer.EOS_ID, "unk": Keys.Tokenizer.UNK_ID,
                "pad": Keys.Tokenizer.PAD_ID}


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    merges: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos" -> id
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | list[dict[str, str]] | None = None  # HF allows a list of named templates

    def write(self, writer: GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.scores:
            writer.add_token_scores(self.scores)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        if self.add_bos is not None:
            writer.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested absurdly deep
        raise QuantkitError(f"{path}: cannot read as JSON ({e})") from e


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre_tokenizer, or None when it is not one we know."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        return _SPLIT_PATTERNS.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def _bpe_vocab(tok: dict, where: Path, vocab_size: int, warnings: list[str]) -> Vocab:
    model = tok["model"]
    ids = dict(model["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens") or []}
    for content, t in added.items():
        ids[content] = t["id"]
    size = max(vocab_size, len(ids))  # the token table: ids beyond it would leave holes no file can justify
    for content, i in ids.items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size:
            raise QuantkitError(f"{where}: token {str(content)[:40]!r} has id {str(i)[:40]}, outside the vocabulary "
                                f"of {size} (config.json vocab_size {vocab_size}, {len(ids)} tokens)")
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(TokenType.UNUSED)] * size
    for content, i in ids.items():
        tokens[i] = content
        special = added.get(content, {}).get("special")
        types[i] = int(TokenType.NORMAL if content not in added else
                       TokenType.CONTROL if special else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre = pre_tokenizer_name(tok.get("pre_tokenizer"))
    if pre is None:
        warnings.append(f"{where}: pre-tokenizer not recognised; wrote tokenizer.ggml.pre = \"default\", "
                        "so llama.cpp may split text differently than transformers")
        pre = "default"
    return Vocab("gpt2", tokens, types, pre=pre, merges=merges)


def _spm_vocab(path: Path, vocab_size: int) -> Vocab:
    try:
        import sentencepiece
    except ImportError as e:
        raise QuantkitError(f"{path}: reading a sentencepiece tokenizer needs the sentencepiece package",
                            "pip install sentencepiece") from e
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(int(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                         else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i)
                         else TokenType.NORMAL))
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))
    specials = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    return Vocab("llama", tokens, types, scores=scores, special_ids={k: v for k, v in specials.items() if v >= 0})


def read_vocab(src: Path, config: dict, vocab_size: int, warnings: list[str]) -> Vocab | None:
    """The tokenizer files beside a checkpoint as a GGUF vocab; None (and a warning) when there are none.
    `vocab_size`: config.json's, checked (Hyper)."""
    tok_json = src / "tokenizer.json"
    tok = _load_json(tok_json) if tok_json.is_file() else None
    model_type = tok.get("model", {}).get("type") if isinstance(tok, dict) and isinstance(tok.get("model"), dict) else None
    try:
        if model_type == "BPE" and not (src / "tokenizer.model").is_file():
            vocab = _bpe_vocab(tok, tok_json, vocab_size, warnings)
        elif (src / "tokenizer.model").is_file():
            vocab = _spm_vocab(src / "tokenizer.model", vocab_size)
        elif tok is not None:
            raise QuantkitError(f"{tok_json}: a {model_type} tokenizer is not supported yet for GGUF",
                                "byte-level BPE tokenizer.json and sentencepiece tokenizer.model are")
        else:
            warnings.append(f"{src}: no tokenizer.json or tokenizer.model; the GGUF has no vocabulary")
            return None
        _add_tokenizer_config(vocab, src, config)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise QuantkitError(f"{src}: tokenizer files have an unexpected structure ({type(e).__name__}: {e})") from e
    return vocab


def _add_tokenizer_config(vocab: Vocab, src: Path, config: dict) -> None:
    tc_path = src / "tokenizer_config.json"
    tc = _load_json(tc_path) if tc_path.is_file() else {}
    index = {t: i for i, t in enumerate(vocab.tokens)}
    for kind in _SPECIALS:
        text = _token_text(tc.get(f"{kind}_token"))
        token_id = config.get(f"{kind}_token_id")
        if text in index:
            vocab.special_ids[kind] = index[text]
        elif isinstance(token_id, int) and not isinstance(token_id, bool) and token_id >= 0:  # -1: none (old LLaMA configs)
            if token_id >= len(vocab.tokens):
                raise QuantkitError(f"{src / 'config.json'}: {kind}_token_id = {token_id} is beyond the vocabulary "
                                    f"of {len(vocab.tokens)} tokens")
            vocab.special_ids.setdefault(kind, token_id)
    for kind in ("bos", "eos"):
        if isinstance(tc.get(f"add_{kind}_token"), bool):
            setattr(vocab, f"add_{kind}", tc[f"add_{kind}_token"])
    template = src / "chat_template.jinja"
    chat_template = template.read_text(encoding="utf-8") if template.is_file() else tc.get("chat_template")
    named = isinstance(chat_template, list) and all(
        isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("template"), str) for c in chat_template)
    vocab.chat_template = chat_template if isinstance(chat_template, str) or named else None


# ------------------------------------------------------------------------------------------ GGUF -> HF


def _pre_tokenizer_json(pre: str | None) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre in _PATTERN_OF:
        split = {"type": "Split", "pattern": {"Regex": _PATTERN_OF[pre]}, "behavior": "Isolated", "invert": False}
        return {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}
    return byte_level


def write_hf_tokenizer(meta: dict[str, Any], out: Path, warnings: list[str]) -> list[str]:
    """Tokenizer files for the GGUF's vocab into `out`; returns the file names written."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens or not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        warnings.append("the GGUF has no usable vocabulary; no tokenizer files written")
        return []
    types = meta.get("tokenizer.ggml.token_type")
    if not isinstance(types, list) or len(types) != len(tokens):
        types = [int(TokenType.NORMAL)] * len(tokens)
    written = []
    merges = meta.get("tokenizer.ggml.merges")
    merges = merges if isinstance(merges, list) else []
    if meta.get("tokenizer.ggml.model") == "gpt2":
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": types[i] != TokenType.CONTROL, "special": types[i] == TokenType.CONTROL}
                 for i, t in enumerate(tokens) if types[i] in (TokenType.CONTROL, TokenType.USER_DEFINED)]
        tok = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": _pre_tokenizer_json(meta.get("tokenizer.ggml.pre")), "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": {t: i for i, t in enumerate(tokens)},
                      "merges": [m for m in merges if isinstance(m, str)]},
        }
        (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
        written.append("tokenizer.json")
    else:
        warnings.append(f"a {meta.get('tokenizer.ggml.model')!r} vocabulary is not rebuilt as tokenizer files "
                        "yet; only tokenizer_config.json is written")
    tc: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for kind in _SPECIALS:
        token_id = meta.get(SPECIAL_KEYS[kind])
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            tc[f"{kind}_token"] = tokens[token_id]
    for kind in ("bos", "eos"):
        if f"tokenizer.ggml.add_{kind}_token" in meta:
            tc[f"add_{kind}_token"] = bool(meta[f"tokenizer.ggml.add_{kind}_token"])
    template = meta.get("tokenizer.chat_template")
    names = meta.get("tokenizer.chat_templates")
    if isinstance(template, str) and isinstance(names, list) and names:
        named = [{"name": n, "template": meta.get(f"tokenizer.chat_template.{n}")} for n in names if isinstance(n, str)]
        tc["chat_template"] = [{"name": "default", "template": template}] + [c for c in named if isinstance(c["template"], str)]
    elif isinstance(template, str) and template:
        tc["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False), encoding="utf-8")
    specials = {k: v for k, v in tc.items() if k.endswith("_token") and not k.startswith("add_")}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False), encoding="utf-8")
    return [*written, "tokenizer_config.json", "special_tokens_map.json"]
