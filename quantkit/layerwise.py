"""Causal-LM logits one module at a time, with transformers' own modelling code (verify --logits).

The model is built on the meta device from config.json (as `from_pretrained` does); its non-persistent
buffers (rotary `inv_freq`, ...) are filled by the model's own `_init_weights`, and the model's normal
`forward` runs. A forward pre-hook on every module that owns parameters loads that module's weights just
in time through transformers' own loader (its checkpoint conversion mapping: prefixes, renamings, fused
MoE experts, tied embeddings), and a forward hook puts them back on the meta device. The input embedding
keeps only the rows of the tokens present and the output head runs in chunks of vocab rows, so peak
memory is the largest module (a Linear, or one layer's fused experts) plus activations and logits.

transformers internals used (5.x; `logits.require_transformers` refuses older):
`core_model_loading.convert_and_load_state_dict_in_model`, `rename_source_key`, `WeightConverter`,
`WeightRenaming`, `conversion_mapping.get_model_conversion_mapping`, `modeling_utils.LoadStateDictConfig`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

import numpy as np
import torch
import transformers
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    convert_and_load_state_dict_in_model,
    rename_source_key,
)
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import logging as hf_logging

from quantkit.api import DenseWeights
from quantkit.errors import QuantkitError

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
ROW_CHUNK = 4096  # vocab rows of the head (and embedding) in memory at once


def meta_model(config: dict, causal: bool = True) -> nn.Module:
    """The model config.json describes, on the meta device (no weight allocated); its buffers real."""
    model_type = config.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise QuantkitError(f"config.json: model_type {model_type!r} is unknown to transformers {transformers.__version__}")
    cfg = transformers.CONFIG_MAPPING[model_type].from_dict(dict(config))
    cls = _model_class(cfg, causal)
    with torch.device("meta"):
        model = cls._from_config(cfg, dtype=torch.float32)
    model.eval()
    # What from_pretrained does for keys a checkpoint lacks: buffers off the meta device, filled by the
    # model's own _init_weights; parameters are flagged so that it leaves them alone.
    for name, buffer in list(model.named_buffers()):
        if buffer is not None and buffer.is_meta:
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent)._buffers[leaf] = torch.empty_like(buffer, device="cpu")
    for p in model.parameters():
        p._is_hf_initialized = True
    model.initialize_weights()
    return model


def _model_class(cfg, causal: bool) -> type:
    for arch in getattr(cfg, "architectures", None) or []:
        if (arch.endswith(CAUSAL_SUFFIXES) or not causal) and hasattr(transformers, arch):
            return getattr(transformers, arch)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    if type(cfg) in auto._model_mapping:
        return auto._model_mapping[type(cfg)]
    raise QuantkitError(f"config.json: transformers has no {'causal-LM ' if causal else ''}class for model_type {cfg.model_type!r}")


class KeyMap:
    """Checkpoint tensor names -> the model's parameter names, by transformers' own conversion rules."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.mapping = get_model_conversion_mapping(model)
        renamings = [e for e in self.mapping if isinstance(e, WeightRenaming)]
        self.converters = [e for e in self.mapping if isinstance(e, WeightConverter)]
        by_pattern = {p: c for c in self.converters for p in c.source_patterns}
        meta = model.state_dict()
        self.targets: dict[str, list[str]] = {}  # model name -> checkpoint names that fill it
        self.sources: dict[str, set[str]] = {}  # checkpoint name -> model names it fills
        self.converted: set[str] = set()  # checkpoint names a converter reshapes (fused experts, ...)
        for key in names:
            target, pattern = rename_source_key(key, renamings, self.converters, model.base_model_prefix, meta)
            if target not in meta and key in meta:
                target, pattern = key, None
            targets = [target]
            if pattern is not None:  # a converter with several outputs (fused qkv -> q, k, v)
                outs = by_pattern[pattern].target_patterns
                targets = list(dict.fromkeys(target.replace(outs[0], out) for out in outs))
                self.converted.add(key)
            for t in targets:
                if t in meta:
                    self.targets.setdefault(t, []).append(key)
                    self.sources.setdefault(key, set()).add(t)


def shape_problems(config: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str]]:
    """(each checkpoint tensor whose shape is not the one the architecture gives its parameter, each
    parameter no tensor fills, tied ones excepted)."""
    causal = any(a.endswith(CAUSAL_SUFFIXES) for a in config.get("architectures") or [])
    model = meta_model(config, causal)
    keys = KeyMap(model, list(shapes))
    params = dict(model.named_parameters(remove_duplicate=False))
    wrong = [f"'{name}' has shape {tuple(shape)}, the architecture implies {tuple(params[target].shape)}"
             for name, shape in shapes.items() if name not in keys.converted
             for target in keys.sources.get(name, ()) if target in params and tuple(params[target].shape) != tuple(shape)]
    aliases = _aliases(model)
    missing = [n for n in params if n not in keys.targets and not any(a in keys.targets for a in aliases.get(n, ()))]
    return wrong, missing


def _aliases(model: nn.Module) -> dict[str, set[str]]:
    """Parameter name -> the other names of the same tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    aliases: dict[str, set[str]] = {}
    for names in by_id.values():
        for n in names:
            aliases.setdefault(n, set()).update(x for x in names if x != n)
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        aliases.setdefault(target, set()).add(source)
        aliases.setdefault(source, set()).add(target)
    return aliases


def limit_heap_growth() -> None:
    """glibc raises its mmap threshold (up to 32 MB) after big frees, so per-module weights of 1-32 MB then
    land on the brk heap, which fragments and never shrinks: measured +40 MB per decoder layer on a
    4096-wide model. A fixed 1 MB threshold (mallopt M_MMAP_THRESHOLD, which also stops the adjustment)
    gives every big block back on free. Process-wide (verify --logits is the process's last work)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD


@contextlib.contextmanager
def _sync_quiet_loading() -> Iterator[None]:
    """transformers' loader one tensor at a time (no thread pool) and without its progress bar."""
    old = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar:
            hf_logging.enable_progress_bar()
        if old is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = old


class _Lazy:
    """Stands in for a safetensors slice in transformers' loader: indexing reads the tensor."""

    def __init__(self, name: str, weights: DenseWeights):
        self.name, self.weights = name, weights

    def __getitem__(self, index):
        return torch.from_numpy(np.ascontiguousarray(self.weights.read(self.name)))[index]


class Runner:
    """The meta model with its hooks; `run(token_ids)` gives float32 logits [N, vocab].

    A unit is what is loaded at once: with `whole_layers` False every module owning parameters directly
    (memory follows the largest module; this relies on no module reading a child's parameters in its own
    forward, and a meta parameter there raises), else each decoder layer whole."""

    def __init__(self, weights: DenseWeights, whole_layers: bool = False):
        self.weights = weights
        self.model = model = meta_model(weights.config)
        self.keys = KeyMap(model, list(weights.shapes))
        self.stats = {"units_loaded": 0, "max_unit_bytes": 0}
        aliases = _aliases(model)
        self.units = _units(model, whole_layers)
        longest_first = sorted(self.units, key=len, reverse=True)
        self.params: dict[str, list[str]] = {u: [] for u in self.units}
        for n, _ in model.named_parameters(remove_duplicate=False):
            self.params[next(u for u in longest_first if u == "" or n.startswith(u + "."))].append(n)
        self.unit_keys: dict[str, list[str]] = {}
        self.unit_alias: dict[str, list[tuple[str, str]]] = {}
        missing = []
        for u, params in self.params.items():
            keys, pairs = [], []
            for n in params:
                source = n if n in self.keys.targets else next((a for a in sorted(aliases.get(n, ())) if a in self.keys.targets), None)
                if source is None:
                    missing.append(n)
                    continue
                keys += self.keys.targets[source]
                if source != n:
                    pairs.append((n, source))
            self.unit_keys[u], self.unit_alias[u] = list(dict.fromkeys(keys)), pairs
        if missing:
            raise QuantkitError(f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {', '.join(missing[:3])}")
        self._aliases = aliases
        self._hooks: list = []
        self._install()

    def _install(self) -> None:
        names = {id(m): n for n, m in self.model.named_modules(remove_duplicate=False)}
        embed, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        embed_key = self._by_rows(names.get(id(embed)), isinstance(embed, nn.Embedding), ("weight",))
        head_key = self._by_rows(names.get(id(head)), type(head) is nn.Linear, ("weight", "bias"))
        for u, module in self.units.items():
            if embed_key and u == names[id(embed)]:
                self._hooks.append(module.register_forward_pre_hook(self._embed_pre(module, embed_key), with_kwargs=True))
            elif head_key and u == names[id(head)]:
                module.forward = self._head_forward(u, module, head_key)
                self._hooks.append(_Restore(module))
            else:
                self._hooks.append(module.register_forward_pre_hook(self._pre(u)))
            self._hooks.append(module.register_forward_hook(self._post(u)))

    def _by_rows(self, unit: str | None, kind_ok: bool, leaves: tuple[str, ...]) -> str | None:
        """The checkpoint name holding this embedding / head's weight as is, when its rows can be read alone."""
        if unit is None or unit not in self.units or not kind_ok:
            return None
        if not set(self.params[unit]) <= {f"{unit}.{leaf}" if unit else leaf for leaf in leaves}:
            return None
        weight = f"{unit}.weight" if unit else "weight"
        for t in [weight, *sorted(self._aliases.get(weight, ()))]:
            keys = self.keys.targets.get(t, [])
            if len(keys) == 1 and keys[0] not in self.keys.converted and keys[0] in self.weights.row_readable:
                return keys[0]
        return None

    def _rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        rows = torch.from_numpy(np.ascontiguousarray(self.weights.read_rows(key, start, stop), dtype=np.float32))
        self._count(rows.numel() * 4)
        return rows

    def _count(self, nbytes: int) -> None:
        self.stats["units_loaded"] += 1
        self.stats["max_unit_bytes"] = max(self.stats["max_unit_bytes"], nbytes)

    def _embed_pre(self, module: nn.Embedding, key: str):
        def pre(mod, args, kwargs):
            ids = args[0] if args else kwargs["input"]
            unique, inverse = torch.unique(ids, return_inverse=True)
            wanted = unique.numpy()
            rows = []
            for start in range(0, module.num_embeddings, ROW_CHUNK):
                stop = min(module.num_embeddings, start + ROW_CHUNK)
                need = wanted[(wanted >= start) & (wanted < stop)]
                if len(need):
                    rows.append(self._rows(key, start, stop)[torch.from_numpy(need - start)])
            module._parameters["weight"] = nn.Parameter(torch.cat(rows), requires_grad=False)
            inverse = inverse.reshape(ids.shape)
            return ((inverse, *args[1:]), kwargs) if args else (args, {**kwargs, "input": inverse})

        return pre

    def _head_forward(self, unit: str, module: nn.Linear, key: str):
        bias_keys = self.keys.targets.get(f"{unit}.bias" if unit else "bias", [])

        def forward(x: torch.Tensor) -> torch.Tensor:
            out = x.new_empty(*x.shape[:-1], module.out_features)
            bias = torch.from_numpy(np.ascontiguousarray(self.weights.read(bias_keys[0]), dtype=np.float32)) if bias_keys else None
            for start in range(0, module.out_features, ROW_CHUNK):
                stop = min(module.out_features, start + ROW_CHUNK)
                out[..., start:stop] = nn.functional.linear(x, self._rows(key, start, stop), None if bias is None else bias[start:stop])
            return out

        return forward

    def _load(self, keys: list[str]) -> None:
        config = LoadStateDictConfig(dtype=torch.float32, device_map={"": "cpu"}, weight_mapping=self.keys.mapping)
        with _sync_quiet_loading():
            info, _ = convert_and_load_state_dict_in_model(self.model, {k: _Lazy(k, self.weights) for k in keys}, config)
        if info.mismatched_keys or info.conversion_errors:
            wrong = sorted(info.mismatched_keys)[:3] or info.conversion_errors
            raise QuantkitError(f"transformers cannot load these tensors into {type(self.model).__name__}: {wrong}")

    def _param(self, name: str) -> tuple[nn.Module, str]:
        parent, _, leaf = name.rpartition(".")
        return self.model.get_submodule(parent), leaf

    def _pre(self, unit: str):
        def pre(module, args):
            self._load(self.unit_keys[unit])
            for name, source in self.unit_alias[unit]:
                mod, leaf = self._param(name)
                src_mod, src_leaf = self._param(source)
                mod._parameters[leaf] = src_mod._parameters[src_leaf]
            nbytes = 0
            for name in self.params[unit]:
                mod, leaf = self._param(name)
                p = mod._parameters[leaf]
                if p.is_meta:
                    raise QuantkitError(f"transformers' loader did not fill {name}")
                nbytes += p.numel() * p.element_size()
            self._count(nbytes)

        return pre

    def _post(self, unit: str):
        touched = set(self.params[unit]) | {source for _, source in self.unit_alias[unit]}
        for key in self.unit_keys[unit]:  # whatever else the loader set from these tensors
            touched |= self.keys.sources.get(key, set())

        def post(module, args, output):
            for name in touched:
                mod, leaf = self._param(name)
                p = mod._parameters[leaf]
                if p is not None and not p.is_meta:
                    mod._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)

        return post

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @torch.inference_mode()
    def run(self, token_ids: list[int]) -> np.ndarray:
        out = self.model(input_ids=torch.tensor([list(token_ids)], dtype=torch.long), use_cache=False)
        return out.logits[0].float().numpy()


class _Restore:
    """Undoes an instance-level forward override (the head's chunked forward)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def _units(model: nn.Module, whole_layers: bool) -> dict[str, nn.Module]:
    units: dict[str, nn.Module] = {}
    layers_name = ""
    if whole_layers:
        layers_name, layers = _decoder_layers(model)
        units = {f"{layers_name}.{i}": layer for i, layer in enumerate(layers)}
    for name, module in model.named_modules(remove_duplicate=False):
        if whole_layers and (name == layers_name or name.startswith(layers_name + ".")):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            units[name] = module
    return units


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the most parameters (the decoder layers)."""
    lists = [(sum(p.numel() for p in m.parameters()), n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise QuantkitError(f"{type(model).__name__} has no list of layers")
    return max(lists, key=lambda x: x[0])[1:]


def logits(weights: DenseWeights, token_ids: list[int]) -> np.ndarray:
    """Logits [N, vocab] float32 for `token_ids`, one module's weights in memory at a time (or one decoder
    layer's, for a model whose code reads a parameter outside the module that owns it)."""
    limit_heap_growth()
    try:
        return _run(Runner(weights), token_ids)
    except (RuntimeError, NotImplementedError) as e:
        if "meta" not in str(e):
            raise
    return _run(Runner(weights, whole_layers=True), token_ids)


def _run(runner: Runner, token_ids: list[int]) -> np.ndarray:
    try:
        return runner.run(token_ids)
    finally:
        runner.close()
