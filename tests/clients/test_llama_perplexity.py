"""verify --logits against llama.cpp's own KL divergence: `llama-perplexity --kl-divergence`.

llama-perplexity scores the second half of each context window (positions n_ctx/2 .. n_ctx-2, the first
token of each window replaced by BOS when the vocab adds one) against log-probabilities it saved from a base
run; we read the exact tokens it used from that file and compute our KL on the same positions, the base
being the safetensors source (llama.cpp's being the F32 GGUF of it).

llama.cpp's figure includes its runtime: its CPU kernels quantize the activations to Q8_0 blocks for every
dot product with Q8_0 or Q4_0 weights, which verify --logits deliberately does not (it measures the
weights). So the test emulates that activation rounding on our side to check the two agree within 10%,
and checks that our weights-only KL is the smaller one.

Needs the tools `scripts/install_clients.py` builds (`make test-clients`); QUANTKIT_LLAMA_TOOLS overrides
where they are looked for.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from quantkit import layerwise, logits
from quantkit.methods.gguf import file as gf
from tests.gguf_checkpoints import make_checkpoint

pytestmark = pytest.mark.clients
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
TOOLS = Path(os.environ.get("QUANTKIT_LLAMA_TOOLS", ROOT / ".clients" / "llama.cpp-build" / "bin"))
N_CTX, CHUNKS = 128, 3


def perplexity(*args) -> str:
    """Run llama-perplexity; its last lines come from an asynchronous logger that now and then loses them
    at exit, so a run without its summary is repeated."""
    tool = TOOLS / "llama-perplexity"
    assert tool.is_file(), f"{tool} not found: run scripts/install_clients.py (make test-clients)"
    for _ in range(5):
        run = subprocess.run([str(tool), "-c", str(N_CTX), "-b", str(N_CTX), "--chunks", str(CHUNKS), "-t", "2", *map(str, args)],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        if re.search(r"Final estimate|Mean    KLD", run.stdout + run.stderr):
            return run.stdout + run.stderr
    raise AssertionError("llama-perplexity never printed its summary")


def base_tokens(path: Path) -> np.ndarray:
    """The token windows a --kl-divergence-base file records: '_logits_', n_ctx, n_vocab, n_chunk, tokens."""
    raw = path.read_bytes()
    assert raw[:8] == b"_logits_"
    n_ctx, _, n_chunk = np.frombuffer(raw[8:20], "<i4")
    return np.frombuffer(raw[20 : 20 + 4 * n_ctx * n_chunk], "<i4").reshape(n_chunk, n_ctx)


def q8_0_activations(x: torch.Tensor) -> torch.Tensor:
    """ggml's quantize_row_q8_0 and back: blocks of 32, scale amax / 127 stored as float16."""
    blocks = x.reshape(-1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, blocks / torch.where(d > 0, d, 1), 0)
    q = torch.sign(q) * torch.floor(q.abs() + 0.5)  # roundf: halves away from zero
    return (q * d.half().float()).reshape(x.shape)


def run_logits(weights, ids, llama_cpp_activations: bool) -> np.ndarray:
    runner = layerwise.Runner(weights)
    if llama_cpp_activations:
        for module in runner.model.modules():
            if isinstance(module, torch.nn.Linear):  # every matrix but the embedding (a row lookup in llama.cpp)
                module.register_forward_pre_hook(lambda mod, args: (q8_0_activations(args[0]),))
        head = runner.model.get_output_embeddings()
        chunked = head.forward  # the runner's own forward over vocab chunks
        head.forward = lambda x: chunked(q8_0_activations(x))
    try:
        return runner.run(ids)
    finally:
        runner.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    folder = make_checkpoint(root / "llama")
    (root / "text.txt").write_text(logits.BUILTIN_TEXT * 3)
    from typer.testing import CliRunner

    from quantkit.cli import app

    for qtype in ("F32", "Q8_0", "Q4_0"):
        args = ["convert", str(folder), str(root / f"{qtype}.gguf"), "--to", "gguf", "--gguf-type", qtype]
        assert CliRunner().invoke(app, args).exit_code == 0
    perplexity("-m", root / "F32.gguf", "-f", root / "text.txt", "--kl-divergence-base", root / "base.kld")
    return folder


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_kl_agrees_with_llama_perplexity(qtype, source):
    root = source.parent
    out = perplexity("-m", root / f"{qtype}.gguf", "--kl-divergence-base", root / "base.kld", "--kl-divergence")
    theirs = float(re.search(r"Mean    KLD:\s+([0-9.eE+-]+)", out).group(1))
    windows = base_tokens(root / "base.kld")
    meta = gf.read_gguf(root / f"{qtype}.gguf").metadata
    add_bos = meta.get("tokenizer.ggml.add_bos_token", False)  # llama.cpp's default for a gpt-2 BPE vocab
    assert windows.shape == (CHUNKS, N_CTX)
    reference, quantized = logits.open_weights(source), logits.open_weights(root / f"{qtype}.gguf")
    ours = {False: [], True: []}
    for window in windows:
        ids = window.tolist()
        if add_bos:
            ids[0] = meta["tokenizer.ggml.bos_token_id"]
        expected = run_logits(reference, ids, False)
        for emulate in ours:
            kl = logits.logit_stats(expected, run_logits(quantized, ids, emulate), ids)["per_position"]["kl"]
            ours[emulate] += kl[N_CTX // 2 : N_CTX - 1]
    weights_only, with_runtime = np.mean(ours[False]), np.mean(ours[True])
    print(f"{qtype}: llama-perplexity mean KLD {theirs:.6g}; ours {with_runtime:.6g} with llama.cpp's activation "
          f"rounding ({with_runtime / theirs - 1:+.1%}), {weights_only:.6g} weights only")
    assert with_runtime == pytest.approx(theirs, rel=0.10)
    assert 0 < weights_only < theirs
