"""Runs inside .venv-llmc (llm-compressor 0.14.0.1): `model_free_ptq SRC OUT SCHEME IGNORE_JSON`."""

import json
import sys

from llmcompressor import model_free_ptq

src, out, scheme, ignore = sys.argv[1:5]
model_free_ptq(src, out, scheme=scheme, ignore=json.loads(ignore), max_workers=1, device="cpu")
