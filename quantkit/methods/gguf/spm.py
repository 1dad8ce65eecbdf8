"""Sentencepiece vocabularies (GGUF's "llama" tokenizer model) as Hugging Face files: `tokenizer.model` (the
sentencepiece ModelProto, protobuf written and read here, field numbers from sentencepiece_model.proto) and a
tokenizer.json that transformers loads (BPE over the pieces, merges ranked by the merged piece's score, byte
fallback), as Llama's own tokenizer.json has it.
"""

from __future__ import annotations

import struct
from typing import Any

from gguf import TokenType

# sentencepiece_model.proto: ModelProto.pieces = 1, .trainer_spec = 2, .normalizer_spec = 3;
# SentencePiece.piece = 1, .score = 2, .type = 3 (its Type enum numbers the types as GGUF's TokenType does);
# TrainerSpec.model_type = 3 (BPE = 2), .vocab_size = 4, .byte_fallback = 35, .unk_id .. .pad_id = 40 .. 43;
# NormalizerSpec.name = 1, .add_dummy_prefix = 3, .remove_extra_whitespaces = 4, .escape_whitespaces = 5.
_BPE = 2
SPACE = "\u2581"  # sentencepiece's visible space


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 ids (pad -1) as protobuf writes them: ten bytes
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: int | bytes | float) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(int(value))


def model_proto(tokens: list[str], scores: list[float], types: list[int], special_ids: dict[str, int],
                add_dummy_prefix: bool = True) -> bytes:
    """A sentencepiece BPE ModelProto holding these pieces (sentencepiece.SentencePieceProcessor loads it).
    Sentencepiece allows one UNKNOWN piece: others (llama.cpp's older converters typed "[PAD<id>]" fillers
    so) are stored UNUSED."""
    unk = special_ids.get("unk", types.index(TokenType.UNKNOWN) if TokenType.UNKNOWN in types else -1)
    types = [int(TokenType.UNUSED) if ty == TokenType.UNKNOWN and i != unk else ty for i, ty in enumerate(types)]
    pieces = b"".join(_field(1, _field(1, t.encode()) + _field(2, float(s)) + _field(3, ty))
                      for t, s, ty in zip(tokens, scores, types, strict=True))
    trainer = _field(3, _BPE) + _field(4, len(tokens)) + _field(35, True)
    for number, kind in ((40, "unk"), (41, "bos"), (42, "eos"), (43, "pad")):
        trainer += _field(number, special_ids.get(kind, -1))
    normalizer = _field(1, b"identity") + _field(3, add_dummy_prefix) + _field(4, False) + _field(5, True)
    return pieces + _field(2, trainer) + _field(3, normalizer)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def _fields(data: bytes):
    """(number, value) of a protobuf message's fields: ints, bytes for length-delimited, raw 4 / 8 bytes."""
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        wire = key & 7
        if wire == 0:
            value, at = _read_varint(data, at)
        elif wire == 2:
            length, at = _read_varint(data, at)
            value, at = data[at : at + length], at + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, at = data[at : at + size], at + size
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield key >> 3, value


def piece_types(proto: bytes) -> list[int]:
    """Each piece's type as the ModelProto stores it (sentencepiece's API cannot tell USER_DEFINED apart)."""
    types = []
    for number, piece in _fields(proto):
        if number == 1:
            types.append(next((v for n, v in _fields(piece) if n == 3), int(TokenType.NORMAL)))
    return types


def _merges(tokens: list[str], scores: list[float], types: list[int]) -> list[list[str]]:
    """BPE merges reproducing sentencepiece's BPE: every split of a normal piece into two pieces, ranked by
    the merged piece's score (highest first), then by the ids of merged, left and right piece."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] in (TokenType.NORMAL, TokenType.USER_DEFINED)}
    ranked = []
    for piece, i in ids.items():
        if types[i] != TokenType.NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, ids[left], ids[right], left, right))
    ranked.sort()
    return [[left, right] for *_, left, right in ranked]


def tokenizer_json(tokens: list[str], scores: list[float], types: list[int], special_ids: dict[str, int],
                   post_processor: dict | None, add_space_prefix: bool = True) -> dict[str, Any]:
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": types[i] != TokenType.USER_DEFINED}
             for i, t in enumerate(tokens) if types[i] in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)]
    unk = special_ids.get("unk")
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        # Llama's own: a space before the text, even one that starts with a space (as llama.cpp does)
        "normalizer": {"type": "Sequence", "normalizers": [
            *([{"type": "Prepend", "prepend": SPACE}] if add_space_prefix else []),
            {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]},
        "pre_tokenizer": None,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
            *([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if add_space_prefix else [])]},
        "model": {"type": "BPE", "dropout": None, "unk_token": tokens[unk] if unk is not None else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                  "ignore_merges": False, "vocab": {t: i for i, t in enumerate(tokens)}, "merges": _merges(tokens, scores, types)},
    }
