"""The model card every output folder gets: README.md with Hugging Face metadata (base_model, tags,
library_name, how it was quantized, verify figures when known), the source's own card kept below ours.

The YAML front matter is read and written with PyYAML (huggingface_hub's own dependency) as
huggingface_hub.ModelCard reads it; huggingface_hub itself costs ~0.6 s to import, more than quantizing a
1 GB model, so it is not used here.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from quantkit.io.source import HUB_ID

CARD = "README.md"
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.S)
INHERITED = ("license", "license_name", "license_link", "language", "datasets", "pipeline_tag")  # carried over


def card_metadata(root: Path | None) -> dict:
    """A folder's card metadata ({} when it has no README.md with valid front matter)."""
    return _source_card(root)[0]


def _source_card(root: Path | None) -> tuple[dict, str]:
    """The source's card metadata and body ({} and "" when it has none or it does not parse)."""
    path = root / CARD if root is not None and root.is_dir() else None
    if path is None or not path.is_file():
        return {}, ""
    text = path.read_text(encoding="utf-8", errors="replace")
    match = _FRONT_MATTER.match(text)
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        meta = None
    if not isinstance(meta, dict):  # a README without valid front matter: keep its text as the body
        return {}, text
    return meta, text[match.end():]


def base_model_of(src: str, source_meta: dict) -> str | None:
    """The hub id SRC names, else the one the source card names."""
    if not Path(src).expanduser().exists() and HUB_ID.match(src):
        return src
    base = source_meta.get("base_model")
    return base if isinstance(base, str) else None


def write_card(folder: Path, src: str, source_root: Path | None, what: str, tags: list[str], settings: dict,
               verify: dict | None = None, library_name: str = "transformers", carried: dict | None = None) -> str:
    """Write `folder`/README.md: our metadata and a short description of `what` was done (e.g. "quantized
    to nf4"), then the source card's text. `carried`: the source's own metadata where it has no card (a
    GGUF's general.* keys); its tags follow ours. Returns the file name. Nothing in it depends on OUT's
    name, so two runs with the same settings write the same card."""
    source_meta, source_body = _source_card(source_root)
    base = base_model_of(src, source_meta)
    extra = {k: source_meta[k] for k in INHERITED if k in source_meta} | dict(carried or {})
    carried_tags = extra.pop("tags", [])
    quantization = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()
                    if v not in (None, ()) and not isinstance(v, dict)}
    if verify:
        quantization["verify"] = verify
    tags = ["quantkit", *tags, *(t for t in carried_tags if t not in tags and t != "quantkit")]
    data = {"base_model": base, "library_name": library_name, "tags": tags, "quantized_by": "quantkit",
            "quantization": quantization, **extra}
    front = yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=False, allow_unicode=True)
    title = f"{Path(src.rstrip('/')).name} ({what.split(' with ')[0]})"  # the same card whatever OUT is called
    lines = [f"# {title}", "",
             f"{'[' + base + '](https://huggingface.co/' + base + ')' if base else 'The source model'} {what} with quantkit.", ""]
    lines += ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in quantization.items() if k != "verify"]
    if verify:
        lines += ["", "verify: " + ", ".join(f"{k} {v}" for k, v in verify.items())]
    if source_body.strip():
        lines += ["", "---", "", "*The source model's card follows.*", "", source_body.strip()]
    (folder / CARD).write_text(f"---\n{front}---\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return CARD
