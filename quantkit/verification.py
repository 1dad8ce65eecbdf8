"""verify: the checks a CI gate runs on a checkpoint, each a small function returning a named result.

A problem in the checkpoint is a failed check (exit 1), never an exception: a truncated shard, a
missing companion, a NaN, a layer that does not match its reference.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from quantkit import api, dtypes, logits, methods
from quantkit.api import Check, Dequantizer, Layer, Report, check_leftovers, first_of
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import ShardReader, iter_row_chunks
from quantkit.io.source import Checkpoint, open_checkpoint, read_config, resolve
from quantkit.io.stream import Progress, TensorReads, no_progress
from quantkit.modules import is_conv1d, shape_problems
from quantkit.numerics import error_figures
from quantkit.plan import dequantizer_for, quantizer_for

SCALE_SUFFIXES = (".absmax", ".nested_absmax", ".SCB", ".scales")
LLAMA_FAMILY = ("llama", "mistral", "qwen2")  # the families whose shapes quantkit knows without transformers
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def check_structure(path: Path) -> tuple[Check, Check, Checkpoint | None]:
    try:
        read_config(path)
    except QuantkitError as e:
        return Check("config", False, e.message), Check("structure", False, "not checked: config.json is unreadable"), None
    try:
        checkpoint = open_checkpoint(path)
    except QuantkitError as e:
        return Check("config", True, "config.json parses"), Check("structure", False, e.message), None
    detail = f"{len(checkpoint.files)} shard(s), {len(checkpoint.tensors)} tensors, headers and offsets valid"
    return Check("config", True, "config.json parses"), Check("structure", True, detail), checkpoint


def check_values(checkpoint: Checkpoint) -> Check:
    """Every float tensor finite; scales (absmax, SCB, scales) finite and >= 0. Streams all the data."""
    problems = []
    for file in checkpoint.files:
        with ShardReader(file) as reader:
            for info in (i for i in checkpoint.tensors.values() if i.file == file and i.dtype in dtypes.FLOATS):
                for start, stop in iter_row_chunks(info, 16 << 20):
                    try:
                        values = dtypes.to_float32(reader.read_rows(info, start, stop), info.dtype)
                    except QuantkitError as e:
                        return Check("values", False, e.message)
                    if not np.isfinite(values).all():
                        problems.append(f"'{info.name}' has NaN or infinite values")
                        break
                    if info.name.endswith(SCALE_SUFFIXES) and (values < 0).any():
                        problems.append(f"'{info.name}' has negative scales")
                        break
    return Check("values", not problems, first_of(problems, "all float tensors finite, scales >= 0"))


def check_undeclared(checkpoint: Checkpoint) -> Check:
    """Without a quantization_config, no tensor may look quantized: loaders would take the packed codes
    for weights (a config deleted or lost in a copy)."""
    for dequantizer in api.DEQUANTIZERS.values():
        modules = dequantizer.modules(checkpoint)
        if modules:
            names = next(iter(modules.values()))
            return Check("quantization", False, f"'{names[0]}' and {len(modules) - 1} more module(s) look quantized "
                                                f"({dequantizer.quant_method}) but config.json has no quantization_config")
    return Check("quantization", True, "not quantized")


def check_quantization(checkpoint: Checkpoint, dequantizer: Dequantizer, modules: dict[str, list[str]]) -> Check:
    problems = dequantizer.check(checkpoint, modules)
    detail = f"{len(modules)} quantized modules with all companions, consistent with quantization_config"
    return Check("quantization", not problems, first_of(problems, detail))


def check_size(checkpoint: Checkpoint, dequantizer: Dequantizer, modules: dict[str, list[str]]) -> Check:
    """Each quantized module's tensors have the bytes the quantizer's own layout predicts for its shape (for
    float companions, the number of values: real writers store scales in bf16 or float32 too)."""
    try:
        options = dequantizer.options(checkpoint)
        # The dtype a checkpoint records (bnb) or decompresses to (compressed-tensors keeps scales in it) shapes layouts.
        source_dtype = dtypes.BY_NAME.get(dequantizer.default_dtype(checkpoint, modules) or "", "F32")
    except QuantkitError as e:  # settings no quantizer takes (bits = 3), a damaged quant_state: named here too
        return Check("size", False, e.message)
    if options is None:
        return Check("size", True, f"no layout to compare: quantkit reads {dequantizer.quant_method} but does not write it")
    quantizer = quantizer_for(options.method)
    problems = []
    actual_total = predicted_total = 0
    for module, names in modules.items():
        try:
            dense = dequantizer.layout(checkpoint, module, names, "F32")[0]
            shape = dense.shape[::-1] if is_conv1d(checkpoint.config, module) else dense.shape
            predicted = quantizer.layout(module, shape, source_dtype, options)
        except QuantkitError as e:
            problems.append(e.message)
            continue
        except api.Unfit as e:
            problems.append(f"'{module}' is quantized, but {options.method} cannot hold it ({e})")
            continue
        for out in predicted:
            info = checkpoint.tensors.get(out.name)
            if info is None:
                continue  # a missing companion is the quantization check's finding
            actual_total += info.nbytes
            predicted_total += out.nbytes
            if info.dtype in dtypes.FLOATS and out.dtype in dtypes.FLOATS:  # scales: whichever float the writer chose
                if info.numel != math.prod(out.shape):
                    problems.append(f"'{out.name}': {info.numel} values on disk, {math.prod(out.shape)} predicted")
            elif info.nbytes != out.nbytes and not (out.variable and info.nbytes <= out.nbytes):
                problems.append(f"'{out.name}': {info.nbytes} bytes on disk, {out.nbytes} predicted")
    detail = f"{actual_total:,} bytes of quantized tensors, as predicted"
    return Check("size", not problems, first_of(problems, detail))


def check_shapes(checkpoint: Checkpoint) -> Check:
    """Every tensor (quantized ones by their dense shape) has the shape the architecture in config.json
    gives it: transformers' meta skeleton when it is installed, else the llama family's known names.
    Parameters the checkpoint lacks are noted, not failed (loaders initialize them, and partial files exist)."""
    try:
        shapes = logits.folder_weights(checkpoint).shapes
    except QuantkitError as e:
        return Check("shapes", True, f"not checked: {e.message}")
    if logits.transformers_available():
        from quantkit import layerwise  # imports torch and transformers (seconds)

        try:
            wrong, missing = layerwise.shape_problems(checkpoint.config, shapes)
        except (QuantkitError, ValueError, TypeError, KeyError, AttributeError) as e:
            return Check("shapes", True, f"not checked: transformers cannot build {checkpoint.architecture} ({e})")
        source = f"as {checkpoint.architecture} needs them"
    elif checkpoint.config.get("model_type") not in LLAMA_FAMILY:
        return Check("shapes", True, f"not checked: {checkpoint.architecture} needs transformers ({logits.INSTALL})")
    else:
        try:
            missing, wrong = shape_problems(checkpoint.config, shapes)
        except (KeyError, TypeError, ZeroDivisionError) as e:
            return Check("shapes", False, f"config.json lacks or garbles a size field ({e})")
        missing = [m.removesuffix(" is missing") for m in missing]
        source = "as config.json's sizes imply"
    note = f"; {len(missing)} parameter(s) not in the checkpoint (loaders initialize them), e.g. {missing[0]}" if missing else ""
    return Check("shapes", not wrong, first_of(wrong, f"{len(shapes)} tensors {source}") + note)


def tokenizer_ids(root: Path) -> int | None:
    """How many token ids the tokenizer files define (highest id + 1); None when that cannot be read."""
    path = root / "tokenizer.json"
    if path.is_file():
        tokenizer = json.loads(path.read_text(encoding="utf-8"))
        vocab = (tokenizer.get("model") or {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [t["id"] for t in tokenizer.get("added_tokens") or []]
        return max(ids) + 1 if ids else 0
    if (root / "vocab.txt").is_file():
        return len((root / "vocab.txt").read_text(encoding="utf-8").splitlines())
    if (root / "vocab.json").is_file():
        ids = list(json.loads((root / "vocab.json").read_text(encoding="utf-8")).values())
        if (root / "added_tokens.json").is_file():
            ids += list(json.loads((root / "added_tokens.json").read_text(encoding="utf-8")).values())
        return max(ids) + 1 if ids else 0
    if (root / "tokenizer.model").is_file() and importlib.util.find_spec("sentencepiece"):
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=str(root / "tokenizer.model")).get_piece_size()
    return None


def chat_templates(root: Path) -> dict[str, str]:
    """Chat templates by where they come from: tokenizer_config.json (a string or named list), *.jinja files."""
    found = {}
    config_path = root / "tokenizer_config.json"
    if config_path.is_file():
        template = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            found["tokenizer_config.json"] = template
        elif isinstance(template, list):
            found |= {f"tokenizer_config.json ({t.get('name')})": t.get("template", "") for t in template if isinstance(t, dict)}
    for path in sorted(root.glob("chat_template*.jinja")):
        found[path.name] = path.read_text(encoding="utf-8")
    return found


def check_tokenizer(checkpoint: Checkpoint) -> Check:
    """Tokenizer files agree with config.json: ids within vocab_size, special token ids defined, chat
    templates parse as Jinja. A folder without tokenizer files passes with a note."""
    root, config = checkpoint.root, checkpoint.config
    if not any((root / name).is_file() for name in logits.TOKENIZER_FILES):
        return Check("tokenizer", True, "no tokenizer files in the folder (loaders will need them from elsewhere)")
    try:
        ids, templates = tokenizer_ids(root), chat_templates(root)
    except (ValueError, UnicodeDecodeError, RecursionError, AttributeError, TypeError, KeyError, OSError) as e:
        return Check("tokenizer", False, f"tokenizer files unreadable ({type(e).__name__}: {e})")
    problems, notes = [], []
    vocab_size = config.get("vocab_size")
    if ids is not None and isinstance(vocab_size, int) and ids > vocab_size:
        problems.append(f"the tokenizer defines ids up to {ids - 1}, config.json's vocab_size is {vocab_size}")
    for key in SPECIAL_IDS:
        value = config.get(key)
        for token in value if isinstance(value, list) else [value]:
            if token is None:
                continue
            limit = ids if ids is not None else vocab_size
            if not isinstance(token, int) or token < 0 or (isinstance(limit, int) and token >= limit):
                problems.append(f"config.json's {key} {token} is not a token id of the tokenizer ({limit} ids)")
    if templates and importlib.util.find_spec("jinja2") is None:
        notes.append("chat template not parsed (jinja2 is not installed)")
    elif templates:
        import jinja2

        for where, template in templates.items():
            try:
                jinja2.Environment().parse(template)
            except jinja2.TemplateSyntaxError as e:
                problems.append(f"the chat template in {where} does not parse as Jinja (line {e.lineno}: {e.message})")
    detail = f"{ids if ids is not None else 'unknown number of'} token ids within vocab_size, special token ids defined"
    detail += f", {len(templates)} chat template(s) parse" if templates and not notes else ""
    return Check("tokenizer", not problems, first_of(problems, "; ".join([detail, *notes])))


class _ErrorSink:
    """Takes what a dequantizer writes (float32 rows, in order) and compares it on the fly with the same
    rows of the reference, so memory follows a chunk, not a tensor."""

    def __init__(self, reference: ShardReader, info):
        self.reference, self.info = reference, info
        self.row_size = max(1, math.prod(info.shape[1:]))
        self.row = 0
        self.norm = self.diff = 0.0  # sums of squares

    def write(self, name: str, chunk) -> None:
        approx = np.asarray(chunk).reshape(-1).view(np.float32).astype(np.float64)
        rows = approx.size // self.row_size
        expected = dtypes.to_float32(self.reference.read_rows(self.info, self.row, self.row + rows), self.info.dtype)
        expected = expected.reshape(-1).astype(np.float64)
        self.norm += float(expected @ expected)
        self.diff += float(((expected - approx) ** 2).sum())
        self.row += rows

    def done(self, name: str) -> None:
        pass

    def result(self) -> tuple[float, float]:
        return error_figures(math.sqrt(self.norm), math.sqrt(self.diff))


def compare_layers(checkpoint: Checkpoint, dequantizer: Dequantizer, modules: dict[str, list[str]], reference: Path,
                   max_error: float | None, progress: Progress = no_progress) -> list[Layer]:
    ref = open_checkpoint(reference)
    scheme = dequantizer.scheme(checkpoint)
    bound = max_error if max_error is not None else dequantizer.error_bound(scheme)
    layers = []
    done, total = 0, sum(checkpoint.tensors[n].nbytes for names in modules.values() for n in names)
    for module, names in modules.items():
        done += sum(checkpoint.tensors[n].nbytes for n in names)
        progress(done, total, module)
        dense = dequantizer.layout(checkpoint, module, names, "F32")[0]
        ref_info = ref.tensors.get(dense.name)
        if ref_info is None or ref_info.shape != dense.shape:
            layers.append(Layer(dense.name, scheme, math.inf, -math.inf, bound, False))
            continue
        with ShardReader(checkpoint.tensors[names[0]].file) as reader, ShardReader(ref_info.file) as ref_reader:
            sink = _ErrorSink(ref_reader, ref_info)
            dequantizer.dequantize(checkpoint, module, names, TensorReads(checkpoint, reader), "F32", sink)
        rel, snr = sink.result()
        layers.append(Layer(dense.name, scheme, rel, snr, bound, rel <= bound))
    return layers


def verify(path: Path, reference: str | None = None, max_error: float | None = None,
           progress: Progress = no_progress, fix: bool = False, logit_text: str | None = None,
           logit_tokens: int | None = None, max_kl: float | None = None) -> Report:
    """Every check on the checkpoint folder or file at `path`; a problem in it is a failed check. Bad input
    (no such path, a file that is neither a checkpoint folder nor a known file format) raises. With
    `logit_tokens` (--logits) also the next-token distributions against `reference`."""
    if logit_tokens is not None and reference is None:
        raise QuantkitError("--logits compares with a reference: add --reference SRC")
    report = _verify(path, reference, max_error, fix, progress)
    if logit_tokens is not None and not report.ok:
        report.checks.append(Check("logits", False, "not run: the checks above failed"))
    elif logit_tokens is not None:
        check, report.logits = logits.compare(path, resolve(reference), logit_text, logit_tokens, max_kl)
        report.checks.append(check)
    return report


def _verify(path: Path, reference: str | None, max_error: float | None, fix: bool, progress: Progress) -> Report:
    if not path.exists():
        leftovers = check_leftovers(path)
        if not leftovers.ok:
            return Report(str(path), [leftovers, Check("structure", False, f"{path} does not exist: the run never finished")])
        path = resolve(str(path))  # a hub repo id (from the cache, or downloaded); else "no such file"
    methods.load()
    file_format = api.file_format_of(path)
    report = file_format.verify(path, reference, max_error, progress) if file_format else None
    if report is not None:
        return report
    if path.is_file():
        raise QuantkitError(f"{path}: a single file; verify checks a checkpoint folder (with its config.json) or a .gguf file",
                            f"pass the folder: quantkit verify {path.parent}")
    report = Report(str(path))
    report.checks.append(check_leftovers(path))
    config_check, structure_check, checkpoint = check_structure(path)
    report.checks += [config_check, structure_check]
    if checkpoint is None:
        return report
    report.checks += [check_values(checkpoint), check_shapes(checkpoint), check_tokenizer(checkpoint)]
    if checkpoint.quantization_config is None:
        report.checks.append(check_undeclared(checkpoint))
        return report
    try:
        dequantizer = dequantizer_for(checkpoint)
        modules = dequantizer.modules(checkpoint)
    except QuantkitError as e:
        report.checks.append(Check("quantization", False, e.message))
        return report
    quantization = check_quantization(checkpoint, dequantizer, modules)
    if fix and not quantization.ok:
        report.fixed = dequantizer.fix(checkpoint, modules)
        if report.fixed:
            checkpoint = open_checkpoint(path)
            quantization = check_quantization(checkpoint, dequantizer, modules)
    report.checks.append(quantization)
    report.checks.append(check_size(checkpoint, dequantizer, modules))
    if reference is not None and report.ok:
        report.layers = compare_layers(checkpoint, dequantizer, modules, resolve(reference), max_error, progress)
        bad = [layer.name for layer in report.layers if not layer.ok]
        worst = max((layer.rel_error for layer in report.layers), default=0.0)
        report.checks.append(Check("reference", not bad, first_of([f"'{n}' differs from the reference beyond its bound" for n in bad],
                                                                f"{len(report.layers)} layers within bounds (worst relative error {worst:.4f})")))
    return report


def write_junit(report: Report, file: Path) -> None:
    cases = [(c.name, c.ok, c.detail) for c in report.checks]
    cases += [(f"layer {x.name}", x.ok, f"relative error {x.rel_error:.5f} (bound {x.max_error}), SNR {x.snr_db:.1f} dB") for x in report.layers]
    if report.logits:
        kl = report.logits["kl"]
        cases += [(f"logits KL {stat}", True, f"{kl[stat]:.6g} nats") for stat in ("mean", "median", "p99", "max")]
        cases += [("logits top-1 agreement", True, f"{report.logits['top1_agreement']:.4f}")]
        cases += [(f"logits perplexity {who}", True, f"{ppl:.6g}") for who, ppl in report.logits["perplexity"].items()]
    suite = ElementTree.Element("testsuite", name=f"quantkit verify {report.path}", tests=str(len(cases)),
                                failures=str(sum(not ok for _, ok, _ in cases)))
    for name, ok, detail in cases:
        case = ElementTree.SubElement(suite, "testcase", classname="quantkit.verify", name=name)
        if not ok:
            ElementTree.SubElement(case, "failure", message=detail).text = detail
        else:
            ElementTree.SubElement(case, "system-out").text = detail
    try:
        ElementTree.ElementTree(suite).write(file, encoding="utf-8", xml_declaration=True)
    except OSError as e:
        raise QuantkitError(f"{file}: cannot write JUnit report ({e.strerror})") from None
