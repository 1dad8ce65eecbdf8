"""Tokenizers in GGUF (`tokenizer.ggml.*`) both ways.

HF -> GGUF: a byte-level BPE `tokenizer.json` becomes llama.cpp's "gpt2" vocab (tokens, types, merges and the
pre-tokenizer's name, found as llama.cpp's converter finds it: the hash of the ids CHECK_TEXT encodes to); a
sentencepiece `tokenizer.model` its "llama" vocab (read with the optional `sentencepiece` package). Special
token ids and the chat template come along.
GGUF -> HF: a "gpt2" vocab becomes tokenizer.json again, split as llama.cpp splits for its pre-tokenizer; a
"llama" vocab tokenizer.model (see spm.py) and tokenizer.json; every vocab gives tokenizer_config.json.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, Keys, TokenType

from quantkit.errors import QuantkitError
from quantkit.methods.gguf import spm
from quantkit.methods.gguf.pretokenizers import CHECK_TEXT, HASHES, IGNORE_MERGES, SPLITS

_SPECIALS = ("bos", "eos", "unk", "pad", "sep", "mask")
SPECIAL_KEYS = {"bos": Keys.Tokenizer.BOS_ID, "eos": Keys.Tokenizer.EOS_ID, "unk": Keys.Tokenizer.UNK_ID,
                "pad": Keys.Tokenizer.PAD_ID, "sep": Keys.Tokenizer.SEP_ID, "mask": Keys.Tokenizer.MASK_ID}
# tokenizer_config.json: the tokenizer.ggml.pre a GGUF had, written by GGUF -> HF (see pre_tokenizer_name)
PRE_KEY = "gguf_pre_tokenizer"
_GPT2_SPLITS = SPLITS["gpt-2"]
_CANONICAL = list({rules: name for name, rules in reversed(SPLITS.items())}.values())  # one name per rule set, the first
# The Split regexes of Llama 3's and Qwen2's own tokenizer.json (llama.cpp spells them without (?i:)).
_HF_SPELLINGS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}  # fmt: skip


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
            writer.add_uint32(SPECIAL_KEYS[kind], token_id)
        if self.add_bos is not None:
            writer.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            writer.add_add_eos_token(self.add_eos)
        if isinstance(self.chat_template, str) and self.chat_template:
            writer.add_chat_template(self.chat_template)
        elif self.chat_template:  # named templates in their order (gguf-py's add_chat_template sets them)
            named = [(c["name"], c["template"]) for c in self.chat_template if c["name"] != "default"]
            for name, template in named:
                writer.add_string(Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name), template)
            if named:
                writer.add_array(Keys.Tokenizer.CHAT_TEMPLATES, [name for name, _ in named])
            default = [c["template"] for c in self.chat_template if c["name"] == "default"]
            if default:
                writer.add_chat_template(default[0])


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested absurdly deep
        raise QuantkitError(f"{path}: cannot read as JSON ({e})") from e


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def check_hash(tokenizer_json: Path) -> str:
    """The sha256 llama.cpp's converter identifies a BPE pre-tokenizer by: of str() of the ids the tokenizer
    (the `tokenizers` library, special tokens added as its post-processor says) encodes CHECK_TEXT to."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise QuantkitError(f"{tokenizer_json}: naming the pre-tokenizer needs the tokenizers package",
                            "pip install tokenizers") from e
    try:
        ids = Tokenizer.from_file(str(tokenizer_json)).encode(CHECK_TEXT).ids
    except Exception as e:  # tokenizers raises its own Exception subclasses for a file it cannot build
        raise QuantkitError(f"{tokenizer_json}: the tokenizers library cannot load it ({e})") from e
    return hashlib.sha256(str(ids).encode()).hexdigest()


def _same_splitting(tok: dict, name: str) -> bool:
    """Whether tokenizer.json's pre_tokenizer splits text as llama.cpp does for `name`: as quantkit writes it
    for that name, or (llama-bpe, qwen2) with the regex as the models' own tokenizer.json spell it."""
    pre = tok.get("pre_tokenizer")
    if pre == _pre_tokenizer_json(name, []):
        return True
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    if not (isinstance(steps, list) and len(steps) == 2 and all(isinstance(step, dict) for step in steps)):
        return False
    regex = (steps[0].get("pattern") or {}).get("Regex") if steps[0].get("type") == "Split" else None
    return _HF_SPELLINGS.get(regex) == name and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)


def pre_tokenizer_name(tok: dict, tokenizer_json: Path, recorded: str | None, warnings: list[str]) -> str:
    """tokenizer.ggml.pre for a BPE tokenizer.json, as llama.cpp's converter names it: by the hash of the ids
    CHECK_TEXT encodes to. A name the folder records (GGUF -> HF writes it) is kept while tokenizer.json still
    splits text as written for it: several names share a hash (qwen2 / qwen35, mpt / olmo). A hash llama.cpp
    does not know (a vocabulary of one's own) gets the name whose splitting rules tokenizer.json has (llama.cpp
    then splits as transformers does), else "default" with one warning naming the hash."""
    if isinstance(recorded, str) and recorded in SPLITS and _same_splitting(tok, recorded):
        return recorded
    digest = check_hash(tokenizer_json)
    if digest in HASHES:
        return HASHES[digest][0]
    same = next((name for name in _CANONICAL if name != "default" and _same_splitting(tok, name)), None)
    if same is not None:
        return same
    warnings.append(f"{tokenizer_json}: pre-tokenizer not in llama.cpp's list (hash {digest}); wrote "
                    "tokenizer.ggml.pre = \"default\", so llama.cpp may split text differently than transformers")
    return "default"


def _bpe_vocab(tok: dict, where: Path, vocab_size: int, recorded_pre: str | None, warnings: list[str]) -> Vocab:
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
    return Vocab("gpt2", tokens, types, pre=pre_tokenizer_name(tok, where, recorded_pre, warnings), merges=merges)


def _spm_vocab(path: Path, vocab_size: int) -> Vocab:
    try:
        import sentencepiece
    except ImportError as e:
        raise QuantkitError(f"{path}: reading a sentencepiece tokenizer needs the sentencepiece package",
                            "pip install sentencepiece") from e
    try:
        proto = path.read_bytes()
        stored_types = spm.piece_types(proto)
    except (OSError, ValueError, IndexError) as e:
        raise QuantkitError(f"{path}: cannot read as a sentencepiece model ({e})") from e
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(int(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                         else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i)
                         else TokenType.USER_DEFINED if stored_types[i] == TokenType.USER_DEFINED else TokenType.NORMAL))
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))
    specials = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    return Vocab("llama", tokens, types, pre="default", scores=scores,
                 special_ids={k: v for k, v in specials.items() if v >= 0})


def read_vocab(src: Path, config: dict, vocab_size: int, warnings: list[str]) -> Vocab | None:
    """The tokenizer files beside a checkpoint as a GGUF vocab; None (and a warning) when there are none.
    `vocab_size`: config.json's, checked (Hyper)."""
    tok_json = src / "tokenizer.json"
    tok = _load_json(tok_json) if tok_json.is_file() else None
    tc_path = src / "tokenizer_config.json"
    tc = _load_json(tc_path) if tc_path.is_file() else {}
    tc = tc if isinstance(tc, dict) else {}
    model_type = tok.get("model", {}).get("type") if isinstance(tok, dict) and isinstance(tok.get("model"), dict) else None
    try:
        if model_type == "BPE" and not (src / "tokenizer.model").is_file():
            vocab = _bpe_vocab(tok, tok_json, vocab_size, tc.get(PRE_KEY), warnings)
        elif (src / "tokenizer.model").is_file():
            vocab = _spm_vocab(src / "tokenizer.model", vocab_size)
        elif tok is not None:
            raise QuantkitError(f"{tok_json}: a {model_type} tokenizer is not supported yet for GGUF",
                                "byte-level BPE tokenizer.json and sentencepiece tokenizer.model are")
        else:
            warnings.append(f"{src}: no tokenizer.json or tokenizer.model; the GGUF has no vocabulary")
            return None
        _add_tokenizer_config(vocab, src, tc, config)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise QuantkitError(f"{src}: tokenizer files have an unexpected structure ({type(e).__name__}: {e})") from e
    return vocab


def _add_tokenizer_config(vocab: Vocab, src: Path, tc: dict, config: dict) -> None:
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


def _pre_tokenizer_json(pre: str | None, warnings: list[str]) -> dict:
    """tokenizer.json's pre_tokenizer splitting text as llama.cpp does for `pre`: its regexes in turn, each
    match a piece of its own, then GPT-2's byte mapping."""
    splits = SPLITS.get(pre or "default")
    if splits is None:
        warnings.append(f"tokenizer.ggml.pre = {pre!r}: quantkit does not know how llama.cpp splits text for it; "
                        "tokenizer.json splits as GPT-2 does")
        splits = _GPT2_SPLITS
    if splits == _GPT2_SPLITS:  # the ByteLevel pre-tokenizer's own regex
        return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    steps = [{"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False} for regex in splits]
    steps.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False})
    return {"type": "Sequence", "pretokenizers": steps}


def _post_processor(tokens: list[str], bos: int | None, eos: int | None) -> dict | None:
    """TemplateProcessing adding BOS / EOS around each sequence (None when neither is added)."""
    if bos is None and eos is None:
        return None
    ends = [i for i in (bos, eos) if i is not None]
    special = {tokens[i]: {"id": tokens[i], "ids": [i], "tokens": [tokens[i]]} for i in ends}

    def around(*names: str) -> list[dict]:
        body = [{"Sequence": {"id": name, "type_id": 0}} for name in names]
        pieces = []
        for name in body:
            pieces += ([{"SpecialToken": {"id": tokens[bos], "type_id": 0}}] if bos is not None else []) + [name]
            pieces += [{"SpecialToken": {"id": tokens[eos], "type_id": 0}}] if eos is not None else []
        return pieces

    return {"type": "TemplateProcessing", "single": around("A"), "pair": around("A", "B"), "special_tokens": special}


def _special_id(meta: dict[str, Any], kind: str, n_tokens: int) -> int | None:
    token_id = meta.get(SPECIAL_KEYS[kind])
    return token_id if isinstance(token_id, int) and 0 <= token_id < n_tokens else None


def _bpe_tokenizer_json(meta: dict[str, Any], tokens: list[str], types: list[int], warnings: list[str]) -> dict:
    pre = meta.get("tokenizer.ggml.pre")
    merges = meta.get("tokenizer.ggml.merges")
    merges = [m for m in merges if isinstance(m, str)] if isinstance(merges, list) else []
    # llama.cpp's converter fills ids a tokenizer lacks with "[PAD<id>]" UNUSED tokens: left out here, they
    # come back the same way
    vocab = {t: i for i, t in enumerate(tokens) if not (types[i] == TokenType.UNUSED and t == f"[PAD{i}]")}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": types[i] != TokenType.CONTROL, "special": types[i] == TokenType.CONTROL}
             for i, t in enumerate(tokens) if types[i] in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    add_bos, add_eos = meta.get("tokenizer.ggml.add_bos_token", False), meta.get("tokenizer.ggml.add_eos_token", False)
    bos, eos = _special_id(meta, "bos", len(tokens)), _special_id(meta, "eos", len(tokens))
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": _pre_tokenizer_json(pre, warnings),
        "post_processor": _post_processor(tokens, bos if add_bos else None, eos if add_eos else None),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre in IGNORE_MERGES, "vocab": vocab, "merges": merges},
    }


def _write_spm(meta: dict[str, Any], tokens: list[str], types: list[int], out: Path, warnings: list[str]) -> list[str]:
    """tokenizer.json and, with the sentencepiece package (which reading it back needs), tokenizer.model."""
    scores = meta.get("tokenizer.ggml.scores")
    scores = scores if isinstance(scores, list) and len(scores) == len(tokens) else [0.0] * len(tokens)
    special_ids = {k: i for k in ("bos", "eos", "unk", "pad") if (i := _special_id(meta, k, len(tokens))) is not None}
    add_bos, add_eos = meta.get("tokenizer.ggml.add_bos_token", True), meta.get("tokenizer.ggml.add_eos_token", False)
    post = _post_processor(tokens, special_ids.get("bos") if add_bos else None, special_ids.get("eos") if add_eos else None)
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok = spm.tokenizer_json(tokens, scores, types, special_ids, post, prefix)
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    try:
        import sentencepiece
    except ImportError:
        warnings.append("sentencepiece is not installed: no tokenizer.model written, so this folder cannot be "
                        "converted back to GGUF (pip install sentencepiece)")
        return ["tokenizer.json"]
    proto = spm.model_proto(tokens, scores, types, special_ids, prefix)
    sentencepiece.SentencePieceProcessor(model_proto=proto)  # raises on a proto it would not load
    (out / "tokenizer.model").write_bytes(proto)
    return ["tokenizer.json", "tokenizer.model"]


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
    tc: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if meta.get("tokenizer.ggml.model") == "gpt2":
        tok = _bpe_tokenizer_json(meta, tokens, types, warnings)
        (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
        written.append("tokenizer.json")
        if isinstance(meta.get("tokenizer.ggml.pre"), str):
            tc[PRE_KEY] = meta["tokenizer.ggml.pre"]
    elif meta.get("tokenizer.ggml.model") == "llama":
        written += _write_spm(meta, tokens, types, out, warnings)
    else:
        warnings.append(f"a {meta.get('tokenizer.ggml.model')!r} vocabulary is not rebuilt as tokenizer files "
                        "yet; only tokenizer_config.json is written")
    for kind in _SPECIALS:
        token_id = _special_id(meta, kind, len(tokens))
        if token_id is not None:
            tc[f"{kind}_token"] = tokens[token_id]
    for kind in ("bos", "eos"):
        if f"tokenizer.ggml.add_{kind}_token" in meta:
            tc[f"add_{kind}_token"] = bool(meta[f"tokenizer.ggml.add_{kind}_token"])
    template = meta.get("tokenizer.chat_template")
    names = meta.get("tokenizer.chat_templates")
    if isinstance(names, list) and names:
        named = [{"name": n, "template": meta.get(f"tokenizer.chat_template.{n}")} for n in names if isinstance(n, str)]
        default = [{"name": "default", "template": template}] if isinstance(template, str) else []
        tc["chat_template"] = default + [c for c in named if isinstance(c["template"], str)]
    elif isinstance(template, str) and template:
        tc["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False), encoding="utf-8")
    specials = {k: v for k, v in tc.items() if k.endswith("_token") and not k.startswith("add_")}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False), encoding="utf-8")
    return [*written, "tokenizer_config.json", "special_tokens_map.json"]
