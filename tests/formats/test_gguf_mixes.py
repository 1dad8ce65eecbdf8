"""llama-quantize's per-tensor choices (mixes.py) checked against rules read from llama.cpp's
src/llama-quant.cpp (llama-cpp-python 0.3.36); that our files equal what llama-quantize writes is
tests/clients/test_llama_quantize.py.

The rules, as the source states them (llama_tensor_get_type_impl), for the mixes checked here:
- output.weight: Q6_K, or Q8_0 when its rows do not hold the file type's blocks; token_embd likewise only
  when there is no output.weight (tied embeddings).
- Q4_K_M / Q5_K_M: attn_v and ffn_down get Q6_K in the layers use_more_bits picks: i < n/8, i >= 7n/8, and
  (i - n/8) % 3 == 2 between. Q4_K_S: attn_v Q5_K in the first 4, ffn_down Q5_K in the first n/8.
- Q3_K_M: attn_v Q5_K in the first 2, else Q4_K; ffn_down Q5_K in the first n/16, else Q4_K; attn_output Q4_K.
- Q2_K: attn_v Q4_K when n_head / n_head_kv >= 4, else Q3_K; ffn_down Q3_K; attn_output Q3_K.
- Fallbacks (tensor_type_fallback): Q2_K / Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
  IQ4_XS -> IQ4_NL, then F16 when not even 32 divides the row.
"""

import pytest
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from quantkit.errors import QuantkitError
from quantkit.methods.gguf import mixes
from quantkit.methods.gguf.convert import grouped_fallbacks
from quantkit.methods.gguf.mixes import parse_file_type


def _llama(n_layer: int, hidden: int = 256, ffn: int = 768, kv: int = 128, vocab: int = 512, tied: bool = False):
    tensors = [("token_embd.weight", (vocab, hidden)), ("output_norm.weight", (hidden,))]
    if not tied:
        tensors.append(("output.weight", (vocab, hidden)))
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", (hidden,)), (p + "attn_q.weight", (hidden, hidden)),
                    (p + "attn_k.weight", (kv, hidden)), (p + "attn_v.weight", (kv, hidden)),
                    (p + "attn_output.weight", (hidden, hidden)), (p + "ffn_norm.weight", (hidden,)),
                    (p + "ffn_gate.weight", (ffn, hidden)), (p + "ffn_up.weight", (ffn, hidden)),
                    (p + "ffn_down.weight", (hidden, ffn))]
    return tensors


def _mix(name: str, n_layer: int, heads=(4, 2), **shape):
    return mixes.tensor_types(parse_file_type(name), "llama", n_layer, _llama(n_layer, **shape),
                              n_head=heads[0], n_head_kv=heads[1])


def _layers(mix, part: str, qtype: Q, n: int) -> list[int]:
    return [i for i in range(n) if mix.types[f"blk.{i}.{part}.weight"] == qtype]


@pytest.mark.parametrize("n", [2, 4, 16, 32, 40])
@pytest.mark.parametrize("name", ["Q4_K_M", "Q5_K_M"])
def test_medium_mixes_give_more_bits_where_llama_cpp_does(name, n):
    mix = _mix(name, n)
    picked = [i for i in range(n) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2]
    assert _layers(mix, "attn_v", Q.Q6_K, n) == picked == _layers(mix, "ffn_down", Q.Q6_K, n)
    default = parse_file_type(name).default
    assert _layers(mix, "attn_v", default, n) == [i for i in range(n) if i not in picked]
    assert {mix.types[f"blk.{i}.{p}.weight"] for i in range(n) for p in ("attn_q", "attn_k", "ffn_up")} == {default}
    assert mix.types["output.weight"] == Q.Q6_K and mix.types["token_embd.weight"] == default
    assert {t for n_, t in mix.types.items() if n_.endswith("norm.weight")} == {Q.F32} and not mix.fallbacks


def test_q4_k_m_32_layers_as_published():
    """The layers llama.cpp's Q4_K_M gives Q6_K in a 32-layer model (Llama-2-7B's published file)."""
    assert _layers(_mix("Q4_K_M", 32), "attn_v", Q.Q6_K, 32) == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_small_and_low_bit_mixes():
    s = _mix("Q4_K_S", 16)
    assert _layers(s, "attn_v", Q.Q5_K, 16) == [0, 1, 2, 3] and _layers(s, "ffn_down", Q.Q5_K, 16) == [0, 1]
    m = _mix("Q3_K_M", 32)
    assert _layers(m, "attn_v", Q.Q5_K, 32) == [0, 1] and _layers(m, "attn_v", Q.Q4_K, 32) == list(range(2, 32))
    assert _layers(m, "ffn_down", Q.Q5_K, 32) == [0, 1] and m.types["blk.5.attn_output.weight"] == Q.Q4_K
    assert _mix("Q2_K", 4, heads=(4, 2)).types["blk.0.attn_v.weight"] == Q.Q3_K
    assert _mix("Q2_K", 4, heads=(8, 2)).types["blk.0.attn_v.weight"] == Q.Q4_K
    assert _mix("Q2_K", 4).types["blk.3.ffn_down.weight"] == Q.Q3_K
    assert _mix("Q6_K", 4).types["blk.3.ffn_down.weight"] == Q.Q6_K
    assert _mix("Q4_0", 4).types["output.weight"] == Q.Q6_K  # even the legacy types get a Q6_K head


def test_tied_embeddings_take_the_output_type():
    mix = _mix("Q4_K_M", 4, tied=True)
    assert mix.types["token_embd.weight"] == Q.Q6_K
    assert mixes.tensor_types(parse_file_type("Q8_0"), "llama", 4, _llama(4, tied=True)).types["token_embd.weight"] == Q.Q8_0


def test_width_576_falls_back_like_llama_quantize():
    """A model whose width is not a multiple of 256 (SmolLM's 576): K-quant rows of 576 fall back."""
    mix = _mix("Q4_K_M", 4, hidden=576, ffn=1536, kv=192)
    assert mix.types["output.weight"] == Q.Q8_0  # rows of 576 do not hold Q4_K: Q8_0 directly, no fallback
    assert mix.types["blk.1.attn_q.weight"] == Q.Q5_0 and mix.types["blk.0.attn_v.weight"] == Q.Q5_0
    assert mix.types["blk.2.attn_v.weight"] == Q.Q8_0  # a more-bits layer: Q6_K falls back to Q8_0
    assert mix.types["blk.2.ffn_down.weight"] == Q.Q6_K  # rows of 1536 hold 256-blocks
    assert mix.types["blk.1.ffn_down.weight"] == Q.Q4_K
    by_name = {f.name: f for f in mix.fallbacks}
    assert "output.weight" not in by_name
    assert (by_name["blk.1.attn_q.weight"].wanted, by_name["blk.1.attn_q.weight"].stored) == (Q.Q4_K, Q.Q5_0)
    assert str(by_name["blk.2.attn_v.weight"]) == "blk.2.attn_v.weight: rows of 576 do not hold Q6_K blocks of 256, stored as Q8_0"
    # q, k, output, gate, up in 4 layers, attn_v in the 2 layers without more bits, token_embd
    assert grouped_fallbacks(mix.fallbacks) == [
        "23 tensors: rows of 576 do not hold Q4_K blocks of 256, stored as Q5_0",
        "2 tensors: rows of 576 do not hold Q6_K blocks of 256, stored as Q8_0"]
    xs = mixes.tensor_types(parse_file_type("IQ4_XS"), "llama", 4, _llama(4, hidden=576, ffn=1536))
    assert xs.types["blk.1.attn_q.weight"] == Q.IQ4_NL and xs.types["output.weight"] == Q.Q8_0
    q5 = mixes.tensor_types(parse_file_type("Q5_K_S"), "llama", 4, _llama(4, hidden=576, ffn=1536))
    assert q5.types["blk.1.attn_q.weight"] == Q.Q5_1


def test_rows_not_even_32_go_to_f16():
    mix = _mix("Q4_K_M", 4, ffn=688)
    assert mix.types["blk.0.ffn_down.weight"] == Q.F16
    assert [f.stored for f in mix.fallbacks if f.name == "blk.0.ffn_down.weight"] == [Q.F16]


def test_quantize_order_is_layer_then_name():
    names = ["blk.10.attn_v.weight", "output.weight", "blk.2.attn_v.weight", "blk.2.attn_k.weight", "token_embd.weight"]
    assert mixes.quantize_order(names) == ["output.weight", "token_embd.weight", "blk.2.attn_k.weight",
                                           "blk.2.attn_v.weight", "blk.10.attn_v.weight"]


def test_file_types_are_llama_cpps():
    for name, file_type in mixes.FILE_TYPES.items():
        assert file_type.value == LlamaFileType[{"F32": "ALL_F32"}.get(name, "MOSTLY_" + name)]
    assert parse_file_type("q4_k") is mixes.FILE_TYPES["Q4_K_M"]  # llama-quantize's alias
    with pytest.raises(QuantkitError, match="unknown GGUF type"):
        parse_file_type("Q4_K_X")


def test_floats_are_not_mixed():
    mix = _mix("F16", 4, hidden=576, ffn=688)
    assert mix.types["output.weight"] == Q.F16 and mix.types["blk.0.ffn_down.weight"] == Q.F16 and not mix.fallbacks
    assert mix.types["blk.0.attn_norm.weight"] == Q.F32
