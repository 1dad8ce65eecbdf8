"""The model card every output folder gets: README.md with Hugging Face metadata (base_model, tags,
library_name, how it was quantized, verify figures when known), the source's own card kept below ours.

huggingface_hub (a declared dependency) parses and writes the YAML front matter; it is imported here,
when a run is finishing, never at start-up.
"""

from __future__ import annotations

from pathlib import Path

from quantkit.io.source import HUB_ID

CARD = "README.md"
INHERITED = ("license", "license_name", "license_link", "language", "datasets", "pipeline_tag")  # carried over


def _source_card(root: Path | None) -> tuple[dict, str]:
    """The source's card metadata and body ({} and "" when it has none or it does not parse)."""
    from huggingface_hub import ModelCard

    path = root / CARD if root is not None and root.is_dir() else None
    if path is None or not path.is_file():
        return {}, ""
    try:
        card = ModelCard.load(path)
    except Exception:  # a README without valid front matter: keep its text as the body
        return {}, path.read_text(encoding="utf-8", errors="replace")
    return card.data.to_dict(), card.text


def base_model_of(src: str, source_meta: dict) -> str | None:
    """The hub id SRC names, else the one the source card names."""
    if not Path(src).expanduser().exists() and HUB_ID.match(src):
        return src
    base = source_meta.get("base_model")
    return base if isinstance(base, str) else None


def write_card(folder: Path, src: str, source_root: Path | None, what: str, tags: list[str], settings: dict,
               verify: dict | None = None, library_name: str = "transformers") -> str:
    """Write `folder`/README.md: our metadata and a short description of `what` was done (e.g. "quantized
    to nf4"), then the source card's text. Returns the file name. Nothing in it depends on OUT's name, so
    two runs with the same settings write the same card."""
    from huggingface_hub import ModelCard, ModelCardData

    source_meta, source_body = _source_card(source_root)
    base = base_model_of(src, source_meta)
    extra = {k: source_meta[k] for k in INHERITED if k in source_meta}
    quantization = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()
                    if v not in (None, ()) and not isinstance(v, dict)}
    if verify:
        quantization["verify"] = verify
    data = ModelCardData(base_model=base, library_name=library_name, tags=["quantkit", *tags],
                         quantized_by="quantkit", quantization=quantization, **extra)
    title = f"{Path(src.rstrip('/')).name} ({what.split(' with ')[0]})"  # the same card whatever OUT is called
    lines = [f"# {title}", "",
             f"{'[' + base + '](https://huggingface.co/' + base + ')' if base else 'The source model'} {what} with quantkit.", ""]
    lines += ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in quantization.items() if k != "verify"]
    if verify:
        lines += ["", "verify: " + ", ".join(f"{k} {v}" for k, v in verify.items())]
    if source_body.strip():
        lines += ["", "---", "", "*The source model's card follows.*", "", source_body.strip()]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    (folder / CARD).write_text(str(card), encoding="utf-8")
    return CARD
