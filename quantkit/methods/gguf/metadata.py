"""The `general.*` keys of a GGUF <-> a model card's YAML metadata (README.md front matter).

HF -> GGUF reads the card as llama.cpp's converter does (gguf-py's metadata.py: which card keys fill which
general.* key, first found wins; tags and languages gather every key that holds them). GGUF -> HF writes
each key under the first card key that llama.cpp reads it from, so the round trip gives the same keys.
"""

from __future__ import annotations

from typing import Any

from gguf import GGUFWriter

# general.* (a string) -> the card keys llama.cpp's converter fills it from, in its order
STRING_KEYS = {
    "general.name": ("name", "model_name"),
    "general.author": ("author", "model_author", "model_creator"),
    "general.version": ("version", "model_version"),
    "general.organization": ("organization", "model_organization"),
    "general.description": ("description", "model_description"),
    "general.finetune": ("finetune", "model_finetune"),
    "general.basename": ("basename", "model_basename", "model_type"),
    "general.size_label": ("size_label", "model_size_label"),
    "general.source.url": ("url", "model_url"),
    "general.source.doi": ("doi", "model_doi"),
    "general.source.uuid": ("uuid", "model_uuid"),
    "general.source.repo_url": ("repo_url", "model_repo_url"),
    "general.license": ("license",),
    "general.license.name": ("license_name",),
    "general.license.link": ("license_link",),
}
# general.* (a list of strings) -> the card keys whose values it gathers (a string or a list each)
LIST_KEYS = {"general.tags": ("tags", "pipeline_tag"), "general.languages": ("language", "languages")}
# what quantkit's own cards add to `tags` (the model's own tags follow them); not the model's
OWN_TAGS = frozenset({"quantkit", "gguf", "dequantized"})


def general_from_card(card: dict[str, Any]) -> dict[str, str | list[str]]:
    """The general.* keys llama.cpp's converter writes for a folder with this card metadata."""
    general: dict[str, str | list[str]] = {}
    for key, card_keys in STRING_KEYS.items():
        value = next((card[k] for k in card_keys if card.get(k) is not None), None)
        if isinstance(value, list) and key == "general.license" and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            general[key] = str(value)
    own = OWN_TAGS if card.get("quantized_by") == "quantkit" else frozenset()
    for key, card_keys in LIST_KEYS.items():
        values: list[str] = []
        for k in card_keys:
            value = card.get(k)
            values += [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
        values = [v for v in values if not (key == "general.tags" and v in own)]
        if values:
            general[key] = values
    return general


def card_from_general(meta: dict[str, Any]) -> dict[str, Any]:
    """Card metadata carrying a GGUF's general.* keys (each under the first card key llama.cpp reads)."""
    card: dict[str, Any] = {}
    for key, card_keys in [*STRING_KEYS.items(), *LIST_KEYS.items()]:
        value = meta.get(key)
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            card[card_keys[0]] = value
    return card


def write_general(writer: GGUFWriter, general: dict[str, str | list[str]]) -> None:
    for key, value in general.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_string(key, value)
