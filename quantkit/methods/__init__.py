"""One folder per format family. Each folder's `register.py` adds its quantizer, reader, file format or
converters to quantkit.api's registries; `load()` imports every one, so adding a method is adding a folder."""

from __future__ import annotations

import functools
import importlib
import pkgutil


@functools.cache
def load() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.ispkg:
            importlib.import_module(f"{__name__}.{module.name}.register")
