"""Keras 3 (torch backend) with keras-hub at model level: a ``LlamaBackbone`` (the ``keras_llama``
architecture) driven through keras-hub's and Keras's own APIs.

==================  =============================================================================
protocol            Keras / keras-hub
==================  =============================================================================
build               ``LlamaBackbone(**config, dtype=...)``, its variables assigned from the spec;
                    ``backbone.enable_lora(rank, target_layer_names=[...])``; the factors assigned
                    to each layer's ``lora_kernel_a/b`` (``lora_embeddings_a/b``)
merge_and_unload    Keras's merge is its save path: ``backbone.save_to_preset(dir)`` writes every
                    LoRA layer's kernel with the LoRA merged and no LoRA variables
                    (``save_own_variables``); ``LlamaBackbone.from_preset(dir)`` is the plain model
save_adapter        ``backbone.save_lora_weights("adapter.lora.h5")``; keras-hub stores the rank but
                    not which layers carry a LoRA, so the target names go in ``lora_targets.json``
                    (what a user has to keep to load it: ``enable_lora(rank, names)`` first, then
                    ``load_lora_weights``)
save_merged         ``save_to_preset`` / ``from_preset``
==================  =============================================================================

keras-hub states a LoRA per layer *name* with one rank for the model and ``alpha = rank``
(``Backbone.enable_lora`` passes no alpha), so the target declares ``uniform_rank``, ``alpha_is_rank``
and a closure over every layer of a targeted name (``query`` targets the query projection of every
block). Keras has no merge that keeps the adapter, no unmerge, no unload or switch to disable a LoRA,
no safe merge, one adapter per model, no rsLoRA, DoRA, LoRA bias or ``modules_to_save``: those cells
are skipped with the reason. Canonical layouts: see ``properties/models/keras_llama.py``.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from properties.models import keras_llama as kl
from properties.models.protocol import ModelCapabilities
from properties.models.spec import ARCHITECTURES, ModelAdapter, ModelSpec
from properties.spec import DTYPES
from properties.targets._library import distribution_version
from properties.targets.protocol import Unsupported

ADAPTER_FILE, TARGETS_FILE = "adapter.lora.h5", "lora_targets.json"
_LAYER = re.compile(r"^transformer_layer_\d+\.")


def _name(path: str) -> str:
    """The Keras layer name ``enable_lora`` matches (the last path segment)."""
    return path.rpartition(".")[2]


def same_name_paths(architecture: str, chosen: list[str]) -> list[str]:
    """Every path an adapter on ``chosen`` covers: ``enable_lora(target_layer_names=...)`` adapts every
    layer of a name, in every block (the strategies keep the paths the model has)."""
    out = list(chosen)
    for p in chosen:
        if _LAYER.match(p):
            out += [_LAYER.sub(f"transformer_layer_{i}.", p) for i in range(16)]
    return list(dict.fromkeys(out))


def _tensor(value: Any) -> torch.Tensor:
    t = value.value if hasattr(value, "value") else value
    return torch.as_tensor(t).detach().clone()


def _heads(layer: Any) -> int:
    """How many leading output blocks share ``lora_kernel_b`` (the kernel's output axes but the last)."""
    if "Embedding" in type(layer).__name__:
        return 1
    nc, no = kl.kernel_axes(layer)
    return math.prod(tuple(layer._kernel.shape)[nc : nc + no - 1])


def _lora_vars(layer: Any) -> tuple[Any, Any]:
    if "Embedding" in type(layer).__name__:
        return layer.lora_embeddings_a, layer.lora_embeddings_b
    return layer.lora_kernel_a, layer.lora_kernel_b


def to_keras_factors(layer: Any, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical ``A (R, in)``, ``B (out, R)`` as Keras's ``a``, ``b`` (``R = heads · r``, ``B`` block-
    diagonal with one repeated block; refused if it is not: Keras cannot hold it)."""
    if "Embedding" in type(layer).__name__:
        return A.T, B.T
    kernel = tuple(layer._kernel.shape)
    nc, _ = kl.kernel_axes(layer)
    u = _heads(layer)
    r, fan_in = A.shape[0] // u, A.shape[1]
    a = A.reshape(u, r, fan_in).permute(2, 0, 1).reshape(*kernel[:-1], r)
    h = B.shape[0] // u
    b = B[:h, :r].T
    if not torch.equal(B, _block_diagonal(b.T, u)):
        raise Unsupported("keras shares lora_kernel_b across heads: this B is not one repeated block")
    return a, b


def from_keras_factors(layer: Any, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keras's ``a``, ``b`` as canonical ``A``, ``B`` (the inverse of :func:`to_keras_factors`)."""
    if "Embedding" in type(layer).__name__:
        return a.T, b.T
    nc, _ = kl.kernel_axes(layer)
    u = _heads(layer)
    r = a.shape[-1]
    fan_in = math.prod(tuple(a.shape)[:nc])
    A = a.reshape(fan_in, u, r).permute(1, 2, 0).reshape(u * r, fan_in)
    return A, _block_diagonal(b.T, u)


def _block_diagonal(block: torch.Tensor, u: int) -> torch.Tensor:
    if u == 1:
        return block
    h, r = block.shape
    out = block.new_zeros(u * h, u * r)
    for j in range(u):
        out[j * h : (j + 1) * h, j * r : (j + 1) * r] = block
    return out


class _LayerModule(nn.Module):
    """A Keras layer seen as a canonical torch layer: ``(..., in) -> (..., out)``, ``.weight`` stored."""

    def __init__(self, layer: Any) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "flat", kl.Flat(layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flat.flat_out(torch.as_tensor(self.layer(self.flat.unflat_in(x))))

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        if self.flat.embedding:
            return _tensor(self.layer._embeddings)
        return kl.to_canonical(self.layer, "kernel", _tensor(self.layer._kernel))


class KerasModelHandle:
    """A keras-hub backbone, with LoRA (``settings``: rank and layer names) or plain (None)."""

    def __init__(self, backbone: Any, spec: ModelSpec, settings: dict[str, Any] | None) -> None:
        self.backbone = backbone
        self.spec = spec
        self.settings = settings

    # -- structure ----------------------------------------------------------------------------------

    def _layers(self) -> dict[str, Any]:
        return {kl.module_path(lyr): lyr for lyr in kl.layers(self.backbone)}

    def _layer(self, path: str) -> Any:
        layer = self._layers().get(path)
        if layer is None:
            raise KeyError(f"the backbone has no layer {path!r}")
        return layer

    def module(self, path: str) -> nn.Module:
        return _LayerModule(self._layer(path))

    def modules(self) -> dict[str, type]:
        out: dict[str, type] = {"": type(self.backbone)}
        unnamed: dict[str, int] = {}
        for lyr in self.backbone._flatten_layers(include_self=False):
            if lyr.path:
                out[kl.module_path(lyr)] = type(lyr)
            else:  # helper layers (dropout, RoPE) have no path and a name numbered per process: counted
                kind = type(lyr).__name__
                unnamed[kind] = unnamed.get(kind, 0) + 1
                out[f"<{kind} {unnamed[kind]}>"] = type(lyr)
        return out

    def parameters(self) -> dict[str, torch.Tensor]:
        return {v.path.replace("/", "."): _tensor(v) for v in self.backbone.weights}

    def base_parameters(self) -> dict[str, torch.Tensor]:
        owners = kl.owner(self.backbone)
        out = {}
        for v in self.backbone.weights:
            name, leaf = kl.param_name(v)
            if not leaf.startswith("lora_"):
                out[name] = kl.to_canonical(owners[v.path], leaf, _tensor(v))
        return out

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {}
        for path, layer in self._layers().items():
            if getattr(layer, "lora_enabled", False):
                a, b = (_tensor(v) for v in _lora_vars(layer))
                out[f"{path}/A"], out[f"{path}/B"] = from_keras_factors(layer, a, b)
        return out

    def snapshot(self) -> dict[str, object]:
        snap: dict[str, object] = {f"param:{k}": v for k, v in self.parameters().items()}
        snap["modules"] = {k: v.__name__ for k, v in self.modules().items()}
        return snap

    # -- forwards -----------------------------------------------------------------------------------

    @torch.no_grad()
    def outputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": torch.as_tensor(self.backbone(dict(batch), training=False)).detach()}

    @torch.no_grad()
    def capture(self, batch: dict[str, torch.Tensor], paths: Sequence[str]) -> dict[str, tuple]:
        """Each layer's (input, output) in canonical form, recorded by wrapping its ``call``."""
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        patched = []
        for path in paths:
            layer = self._layer(path)
            flat, original = kl.Flat(layer), layer.call

            def call(inputs, *args, path=path, flat=flat, original=original, **kwargs):
                y = original(inputs, *args, **kwargs)
                seen.setdefault(
                    path, (flat.flat_in(inputs).detach().clone(), flat.flat_out(y).detach().clone())
                )
                return y

            layer.__dict__["call"] = call
            patched.append(layer)
        try:
            self.outputs(batch)
        finally:
            for layer in patched:
                layer.__dict__.pop("call", None)
        return seen

    # -- what Keras does ----------------------------------------------------------------------------

    def merge_and_unload(self, *, safe: bool = False) -> None:
        """Keras's save path (merged kernels, no LoRA variables) and keras-hub's loader."""
        if safe:
            raise Unsupported("keras has no safe merge")
        with tempfile.TemporaryDirectory(prefix="lora-conformance-keras-") as tmp:
            self.backbone.save_to_preset(tmp)
            self.backbone = load_preset(tmp, self.spec.dtype)
        self.settings = None

    def save_adapter(self, directory: Path, name: str) -> None:
        if self.settings is None:
            raise ValueError("no LoRA on this model")
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_lora_weights(str(directory / ADAPTER_FILE))
        (directory / TARGETS_FILE).write_text(json.dumps(self.settings))

    def saved_tensors(self, directory: Path) -> dict[str, torch.Tensor]:
        """The ``.lora.h5`` file's factors in canonical layout (its ``rank`` entry is a setting)."""
        import h5py

        indexed = kl.layers(self.backbone)
        out = {}
        with h5py.File(directory / ADAPTER_FILE, "r") as f:
            for index, group in f["lora"].items():
                if not index.isdigit():  # ``lora/vars/rank``: a setting, not a tensor of the adapter
                    continue
                tensors = {k: torch.from_numpy(v[()]) for k, v in group["vars"].items()}
                layer = indexed[int(index)]
                a, b = (tensors[k] for k in sorted(tensors))  # lora_*_a, lora_*_b
                out[f"lora/{index}/A"], out[f"lora/{index}/B"] = from_keras_factors(layer, a, b)
        return out

    def load_adapter(self, directory: Path, name: str) -> list[str]:
        self.backbone.load_lora_weights(str(directory / ADAPTER_FILE))
        return []

    def save_merged(self, directory: Path) -> None:
        if self.settings is not None:
            raise ValueError("still a LoRA model: merge_and_unload first")
        self.backbone.save_to_preset(str(directory))

    # -- what Keras does not have ---------------------------------------------------------------------

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        raise Unsupported("keras merges only by saving: no in-place merge that keeps the LoRA")

    def unmerge(self) -> None:
        raise Unsupported("keras has no unmerge")

    def unload(self) -> None:
        raise Unsupported("keras has no unload")

    def disabled(self) -> AbstractContextManager[None]:
        raise Unsupported("keras cannot disable a LoRA")

    def set_active(self, names: Sequence[str]) -> None:
        raise Unsupported("keras-hub has one LoRA per model")

    def add_adapter(self, adapter: ModelAdapter) -> None:
        raise Unsupported("keras-hub has one LoRA per model")

    def delete_adapter(self, name: str) -> None:
        raise Unsupported("keras-hub has one LoRA per model")

    def add_weighted_adapter(self, names: Sequence[str], weights: Sequence[float], new_name: str) -> None:
        raise Unsupported("keras has no weighted combination of adapters")


def load_preset(directory: str, dtype: torch.dtype) -> Any:
    """``LlamaBackbone.from_preset`` of a local directory in ``dtype``: without ``dtype=`` keras-hub
    loads a float preset in Keras's default floatx (documented in ``_resolve_dtype``), so a user
    reloading a bfloat16 model passes it. Keras seeds its initialisers from ``random``: kept."""
    with kl.rng_kept():
        return kl.keras_hub().models.LlamaBackbone.from_preset(directory, dtype=kl.dtype_name(dtype))


def _settings(adapter: ModelAdapter, config: dict[str, object], paths: tuple[str, ...]) -> dict[str, Any]:
    """keras-hub's ``enable_lora`` arguments for ``adapter``: one rank, alpha = rank, whole names."""
    if adapter.use_rslora or adapter.use_dora or adapter.lora_bias or adapter.modules_to_save:
        raise Unsupported("keras has no rsLoRA, DoRA, LoRA bias or modules_to_save")
    names = sorted({_name(p) for p in adapter.modules})
    covered = [p for p in paths if _name(p) in names]
    if sorted(covered) != sorted(adapter.modules):
        raise Unsupported("keras-hub's enable_lora adapts every layer of a name: these targets are a part")
    pairs = {
        (a.r // kl.heads_of(p, config), a.alpha / kl.heads_of(p, config)) for p, a in adapter.modules.items()
    }
    if len(pairs) != 1:
        raise Unsupported("keras-hub's enable_lora takes one rank for the model")
    ((r, alpha),) = pairs
    if alpha != r:
        raise Unsupported("keras-hub's enable_lora has no alpha: alpha is the rank")
    return {"rank": int(r), "target_layer_names": names}


class KerasModelTarget:
    """keras-hub's ``LlamaBackbone`` on Keras 3's torch backend, with ``Backbone.enable_lora``."""

    name = "keras"
    is_model_target = True

    def version(self) -> str:
        return f"{distribution_version('keras')} (keras-hub {distribution_version('keras-hub')})"

    def capabilities(self) -> ModelCapabilities:
        why = kl.missing()
        v = (
            "keras"
            if why
            else f"keras {distribution_version('keras')}, keras-hub {distribution_version('keras-hub')}"
        )
        lacks = {
            "merge": "no in-place merge that keeps the LoRA (merging is saving)",
            "unmerge": "no unmerge",
            "unload": "no unload",
            "disable": "a LoRA cannot be disabled",
            "safe_merge": "the save path has no finiteness check",
            "set_active": "one LoRA per model",
            "add_adapter": "one LoRA per model",
            "delete_adapter": "one LoRA per model",
            "weighted_cat": "no weighted combination of adapters",
            "multi_adapter": "one LoRA per model",
            "rslora": "scaling is lora_alpha / rank",
            "dora": "no DoRA",
            "lora_bias": "no LoRA bias",
            "modules_to_save": "no modules_to_save",
            "tied_target": "a tied table is one ReversibleEmbedding layer: no LoRA on one side of it",
        }
        notes = {k: f"{v}: {reason}" for k, reason in lacks.items()}
        notes.update({a: f"{v}: its models are keras-hub's" for a in ARCHITECTURES if a != kl.ARCHITECTURE})
        if why:
            notes[kl.ARCHITECTURE] = why
        return ModelCapabilities(
            layers=frozenset(() if why else {kl.ARCHITECTURE}),
            dtypes=frozenset(DTYPES.values()),
            operations=frozenset({"merge_and_unload", "save_adapter", "save_merged"}),
            options=frozenset(),
            notes=notes,
            closure=same_name_paths,
            uniform_rank=True,
            alpha_is_rank=True,
        )

    def _backbone(self, spec: ModelSpec) -> Any:
        if spec.architecture != kl.ARCHITECTURE:
            raise Unsupported(f"keras: no {spec.architecture} model")
        model = kl.backbone(spec.config, spec.dtype)
        owners = kl.owner(model)
        for v in model.weights:
            name, leaf = kl.param_name(v)
            v.assign(kl.to_keras(owners[v.path], leaf, spec.base[name], tuple(v.shape)).contiguous())
        return model

    def build_base(self, spec: ModelSpec) -> KerasModelHandle:
        return KerasModelHandle(self._backbone(spec), spec, None)

    def build(self, spec: ModelSpec) -> KerasModelHandle:
        if len(spec.adapters) != 1:
            raise Unsupported("keras-hub has one LoRA per model")
        adapter = spec.adapters[0]
        _, paths, _ = kl.layout(spec.config)
        settings = _settings(adapter, spec.config, paths)
        model = self._backbone(spec)
        with kl.rng_kept():
            model.enable_lora(settings["rank"], target_layer_names=settings["target_layer_names"])
        h = KerasModelHandle(model, spec, settings)
        layers = h._layers()
        for path, a in adapter.modules.items():
            layer = layers[path]
            for var, value in zip(_lora_vars(layer), to_keras_factors(layer, a.A, a.B), strict=True):
                var.assign(value.contiguous())
        return h

    def load_adapter(self, spec: ModelSpec, directory: Path, name: str) -> tuple[KerasModelHandle, list[str]]:
        """A fresh base, ``enable_lora`` as the adapter was saved, then ``load_lora_weights``."""
        settings = json.loads((directory / TARGETS_FILE).read_text())
        h = self.build_base(spec)
        with kl.rng_kept():
            h.backbone.enable_lora(settings["rank"], target_layer_names=settings["target_layer_names"])
        h.settings = settings
        return h, h.load_adapter(directory, name)

    def load_merged(self, spec: ModelSpec, directory: Path) -> KerasModelHandle:
        return KerasModelHandle(load_preset(str(directory), spec.dtype), spec, None)


TARGET = KerasModelTarget()
