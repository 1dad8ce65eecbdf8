"""Real vocabularies llama.cpp wrote (models/ggml-vocab-*.gguf in the llama.cpp sources that the
llama-cpp-python sdist vendors, unpacked by scripts/install_clients.py), each with its test texts (.inp) and
the ids the model's own Hugging Face tokenizer gives them (.out).

Each vocabulary goes into a tiny random llama GGUF (with general.* metadata beside it), then through
quantkit GGUF -> safetensors -> GGUF: transformers must encode every text to the .out ids from the folder
quantkit writes, the GGUF that comes back must carry the same general.* and tokenizer.* keys, and llama.cpp
must tokenize every text the same with the original vocabulary and the round-tripped one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

from quantkit.io.source import open_checkpoint
from quantkit.methods.gguf import convert as gc
from quantkit.methods.gguf import file as gf

pytestmark = pytest.mark.clients
try:
    import llama_cpp
except ImportError:  # collected by plain `make test` too (deselected there); a clients run must fail
    llama_cpp = None

MODELS = Path(__file__).resolve().parents[2] / ".clients" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "models"
BPE = ["gpt-2", "llama-bpe", "qwen2", "qwen35", "deepseek-coder", "deepseek-llm", "falcon", "starcoder", "refact",
       "command-r", "mpt"]
SPM = ["llama-spm", "phi-3"]  # sentencepiece: tokenizer.model rebuilt (the sentencepiece extra)
GENERAL = {"general.basename": "tiny", "general.size_label": "1M", "general.license": "apache-2.0",
           "general.languages": ["en", "fr"], "general.organization": "Quantkit Tests", "general.finetune": "vocab",
           "general.version": "v1", "general.tags": ["text-generation", "tiny"], "general.author": "quantkit"}
N_EMBD, N_FF, N_HEAD, N_KV = 32, 64, 4, 2


def vocab_file(name: str) -> Path:
    path = MODELS / f"ggml-vocab-{name}.gguf"
    assert path.is_file(), f"{path} not found: run scripts/install_clients.py (make test-clients)"
    return path


def texts(name: str) -> list[tuple[str, list[int]]]:
    """(text, the ids the model's own HF tokenizer gives it) from the .inp / .out files."""
    inp = vocab_file(name).with_suffix(".gguf.inp").read_text(encoding="utf-8")
    out = vocab_file(name).with_suffix(".gguf.out").read_text(encoding="utf-8")
    cases = inp.removesuffix("\n__ggml_vocab_test__\n").split("\n__ggml_vocab_test__\n")
    ids = [[int(i) for i in line.split()] for line in out.split("\n")[: len(cases)]]
    assert len(cases) == len(ids) > 40
    return list(zip(cases, ids, strict=True))


def _add(writer: GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)  # tokens / merges: strings, types: int32, scores: float32


def tiny_llama(vocab: Path, out: Path) -> Path:
    """A one-layer random llama in F16 whose tokenizer.* keys are `vocab`'s, with GENERAL's keys."""
    meta = gf.read_gguf(vocab).metadata
    n_vocab = len(meta["tokenizer.ggml.tokens"])
    writer = GGUFWriter(out, "llama")
    writer.add_name(meta["general.name"])
    for key, value in GENERAL.items():
        _add(writer, key, value)
    writer.add_file_type(1)
    writer.add_quantization_version(2)
    for key, value in [("block_count", 1), ("context_length", 128), ("embedding_length", N_EMBD),
                       ("feed_forward_length", N_FF), ("attention.head_count", N_HEAD), ("attention.head_count_kv", N_KV),
                       ("rope.dimension_count", N_EMBD // N_HEAD), ("vocab_size", n_vocab)]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    for key, value in meta.items():
        if key.startswith("tokenizer."):
            _add(writer, key, value)
    rng = np.random.default_rng(0)
    kv = N_EMBD // N_HEAD * N_KV
    shapes = {"token_embd.weight": (n_vocab, N_EMBD), "output_norm.weight": (N_EMBD,), "output.weight": (n_vocab, N_EMBD),
              "blk.0.attn_norm.weight": (N_EMBD,), "blk.0.attn_q.weight": (N_EMBD, N_EMBD), "blk.0.attn_k.weight": (kv, N_EMBD),
              "blk.0.attn_v.weight": (kv, N_EMBD), "blk.0.attn_output.weight": (N_EMBD, N_EMBD), "blk.0.ffn_norm.weight": (N_EMBD,),
              "blk.0.ffn_gate.weight": (N_FF, N_EMBD), "blk.0.ffn_up.weight": (N_FF, N_EMBD), "blk.0.ffn_down.weight": (N_EMBD, N_FF)}
    for name, shape in shapes.items():
        values = rng.standard_normal(shape, dtype=np.float32) * 0.02
        writer.add_tensor(name, values if len(shape) == 1 else values.astype(np.float16), raw_dtype=Q.F32 if len(shape) == 1 else Q.F16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    """name -> (original GGUF, HF folder quantkit wrote from it, the GGUF quantkit wrote back from that)."""
    done = {}

    def get(name: str):
        if name not in done:
            tmp = tmp_path_factory.mktemp(name)
            original = tiny_llama(vocab_file(name), tmp / "original.gguf")
            gc.gguf_to_safetensors(original, tmp / "hf")
            report = gc.to_gguf(open_checkpoint(tmp / "hf"), tmp / "back.gguf", Q.F16)
            assert report.warnings == []
            done[name] = original, tmp / "hf", tmp / "back.gguf"
        return done[name]

    return get


@pytest.mark.parametrize("name", BPE + SPM)
def test_transformers_encodes_every_text_as_the_model_does(round_trips, name):
    from transformers import AutoTokenizer

    _, hf, _ = round_trips(name)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    wrong = [(text, ids) for text, ids in texts(name) if tokenizer.encode(text, add_special_tokens=False) != ids]
    assert not wrong, f"{len(wrong)} texts differ, first {wrong[0][0]!r}"


@pytest.mark.parametrize("name", BPE + SPM)
def test_round_trip_keeps_every_tokenizer_and_general_key(round_trips, name):
    original, _, back = round_trips(name)
    ours, theirs = gf.read_gguf(back).metadata, gf.read_gguf(original).metadata
    keys = {k for k in [*ours, *theirs] if k.startswith(("general.", "tokenizer."))}
    if name == "phi-3":  # its "[PAD<id>]" fillers are typed UNKNOWN, which sentencepiece allows one piece: UNUSED
        fillers = [i for i, t in enumerate(theirs["tokenizer.ggml.tokens"]) if t == f"[PAD{i}]"]
        assert len(fillers) == 53 and all(theirs["tokenizer.ggml.token_type"][i] == 2 for i in fillers)
        assert all(ours["tokenizer.ggml.token_type"][i] == 5 for i in fillers)
        for i in fillers:
            ours["tokenizer.ggml.token_type"][i] = 2
    different = sorted(k for k in keys if ours.get(k) != theirs.get(k))
    assert not different, {k: (str(theirs.get(k))[:60], str(ours.get(k))[:60]) for k in different}
    assert ours["tokenizer.ggml.pre"] == theirs["tokenizer.ggml.pre"] == gf.read_gguf(vocab_file(name)).metadata["tokenizer.ggml.pre"]
    assert {k: ours[k] for k in GENERAL} == GENERAL


def _llama_cpp_tokens(path: Path, cases: list[str]) -> list[list[int]]:
    if llama_cpp is None:
        pytest.fail("llama_cpp is not installed: `make test-clients` installs llama-cpp-python (scripts/install_clients.py)")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(text.encode(), add_bos=False, special=False) for text in cases]
    finally:
        llm.close()


@pytest.mark.parametrize("name", BPE + SPM)
def test_llama_cpp_tokenizes_the_round_trip_as_the_original(round_trips, name):
    original, _, back = round_trips(name)
    cases = [text for text, _ in texts(name)]
    assert _llama_cpp_tokens(back, cases) == _llama_cpp_tokens(vocab_file(name), cases) == _llama_cpp_tokens(original, cases)


# The name llama.cpp's table gives each rebuilt tokenizer.json by its hash alone. Where it differs from the file's
# own: mpt / olmo share their splitting rules; qwen35 splits as qwen2 except around combining marks, which the
# check text lacks (so quantkit keeps the recorded name); llama-bpe's vocabulary file does not ask for BOS,
# which Llama 3's own tokenizer.json adds: the hash without BOS is Smaug's, whose rules are Llama 3's.
BY_HASH = {"qwen35": "qwen2", "mpt": "olmo", "llama-bpe": "smaug-bpe"}


@pytest.mark.parametrize("name", BPE)
def test_rebuilt_tokenizer_is_named_by_its_hash(round_trips, name):
    from quantkit.methods.gguf.pretokenizers import HASHES, SPLITS
    from quantkit.methods.gguf.vocab import check_hash

    _, hf, _ = round_trips(name)
    [by_hash] = HASHES[check_hash(hf / "tokenizer.json")][:1]
    assert by_hash == BY_HASH.get(name, name)
    assert (SPLITS[by_hash] == SPLITS[name]) is (name != "qwen35")
