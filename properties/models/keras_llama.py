"""keras-hub's ``LlamaBackbone`` (Keras 3, torch backend) as an architecture of the model half, built in
memory from a drawn config (nothing is downloaded).

Keras layers are not ``nn.Linear`` modules, so this module does two jobs:

- It names the backbone's variables the way the rest of the model half names parameters: a module
  path is the Keras layer path with ``.`` for ``/`` (``transformer_layer_0.self_attention.query``),
  and every kernel, embedding table and norm scale is ``<path>.weight`` in the layer half's canonical
  layout: a ``Dense`` kernel ``(in, out)`` is stored transposed; an ``EinsumDense`` kernel is its
  matrix from the contracted axes to the output axes (``muh`` of ``bqm,muh->bquh`` is ``(u·h, m)``).
  The untied output table is ``token_embedding.reverse_embeddings`` as Keras stores it.
  :func:`to_canonical` / :func:`to_keras` convert, bit-exactly, both ways.
- :func:`construct` returns :class:`KerasLlama`, a torch module around a real backbone in which each
  targetable Keras layer computes its product through a torch ``nn.Linear`` / ``nn.Embedding`` at the
  same path. Norms, RoPE, attention and masks stay keras-hub's own code. The reference (``lora_core``)
  wraps those torch modules as it wraps any model's; the ``keras`` model target never uses it: it
  builds a plain ``LlamaBackbone`` and drives Keras's own LoRA (``properties/models/targets/keras.py``).

The LoRA Keras puts on an ``EinsumDense`` is not always a LoRA of that matrix: ``enable_lora`` makes
``lora_kernel_a`` of the kernel's shape but the last axis (``(m, u, r)`` for ``muh``) and
``lora_kernel_b`` ``(r, h)``. On the query/key/value projections that is one ``(m → r)`` factor per head
and one ``(r → h)`` factor shared by all heads. In canonical form it is a LoRA of rank ``u·r`` (alpha
``u·alpha``, the same scaling) whose ``B`` is block-diagonal with the same block on every head
(:func:`lora_structure`, :func:`lora_fill`), so the layer half's oracle and bound judge it as they are.

The forward takes ``token_ids`` and ``padding_mask``; padding is drawn on the right only (a left-padded
causal row attends to nothing, which asks nothing of LoRA). The family needs keras-hub on Keras's torch
backend (``python scripts/envs.py create keras``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st
from torch import nn

from properties.models.families import (
    draw_gqa_dims,
    load_state_and_config,
    one_layer_fewer,
    save_state_and_config,
)

ARCHITECTURE = "keras_llama"
LAYERS_KEY = "num_layers"
CONFIG_FILE, WEIGHTS_FILE = "keras_llama.json", "keras_llama.pth"
# the variable names Keras gives what the suite calls ``weight``
_WEIGHT_LEAVES = ("kernel", "embeddings", "scale")
_HEADS = {"query": "num_query_heads", "key": "num_key_value_heads", "value": "num_key_value_heads"}


def missing() -> str | None:
    if importlib.util.find_spec("keras_hub") is None or importlib.util.find_spec("keras") is None:
        return "the keras_llama architecture needs keras-hub on Keras's torch backend (envs/keras)"
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    if keras.backend.backend() != "torch":
        return f"keras runs on the {keras.backend.backend()} backend: set KERAS_BACKEND=torch"
    importlib.import_module("keras_hub")  # before any example is drawn (it is slow to import)
    return None


def keras_hub() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras_hub as kh

    return kh


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def rng_kept() -> Iterator[None]:
    """Keras seeds its initialisers from Python's ``random`` (and may touch NumPy's and torch's): the
    suite leaves every global generator as it found it, and Hypothesis flags strategies that use them."""
    state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def backbone(config: dict[str, object], dtype: torch.dtype) -> Any:
    """A plain keras-hub ``LlamaBackbone`` of ``config``. Embeddings are untied: keras-hub 0.32's
    ``get_config`` leaves ``tie_word_embeddings`` out, so a tied backbone does not reload from its
    own preset (``from_preset`` builds an untied one and refuses the weights)."""
    with rng_kept():
        return keras_hub().models.LlamaBackbone(**config, dtype=dtype_name(dtype))


def layers(model: Any) -> list[Any]:
    """The backbone's layers holding variables, in Keras's own order (the index ``save_lora_weights``
    uses to name a layer)."""
    return [lyr for lyr in model._flatten_layers(include_self=False) if lyr.weights]


def module_path(layer: Any) -> str:
    return layer.path.replace("/", ".")


def is_targetable(layer: Any) -> bool:
    """A layer ``enable_lora`` adapts and that owns one kernel/table (not a container of such layers)."""
    name = type(layer).__name__
    return name in ("Dense", "EinsumDense", "ReversibleEmbedding", "Embedding")


@functools.lru_cache(maxsize=64)
def _einsum_axes(equation: str) -> tuple[int, int]:
    """(contracted axes, output axes) of an ``EinsumDense`` kernel, which must be laid out contracted
    first (every keras-hub Llama projection is)."""
    inputs, out = equation.split("->")
    x, k = inputs.split(",")
    contracted = [c for c in k if c not in out]
    produced = [c for c in k if c in out]
    if list(k) != contracted + produced or not set(contracted) <= set(x):
        raise ValueError(f"EinsumDense equation {equation!r}: kernel not laid out contracted-then-output")
    return len(contracted), len(produced)


def kernel_axes(layer: Any) -> tuple[int, int]:
    """(contracted, output) axes of a layer's kernel: ``Dense`` is (1, 1)."""
    return _einsum_axes(layer.equation) if type(layer).__name__ == "EinsumDense" else (1, 1)


def to_canonical(layer: Any, leaf: str, value: torch.Tensor) -> torch.Tensor:
    """A Keras variable as the suite stores it (``(out, in)`` for a kernel; everything else as is)."""
    if leaf != "kernel":
        return value
    nc, _ = kernel_axes(layer)
    shape = tuple(value.shape)
    return value.reshape(math.prod(shape[:nc]), math.prod(shape[nc:])).T


def to_keras(layer: Any, leaf: str, value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of :func:`to_canonical` for a variable of Keras shape ``shape``."""
    return value.T.reshape(shape) if leaf == "kernel" else value.reshape(shape)


def param_name(variable: Any) -> tuple[str, str]:
    """(suite parameter name, Keras leaf) of a backbone variable."""
    path, _, leaf = variable.path.rpartition("/")
    suite_leaf = "weight" if leaf in _WEIGHT_LEAVES else leaf
    return f"{path.replace('/', '.')}.{suite_leaf}", leaf


def owner(model: Any) -> dict[str, Any]:
    """Keras variable path -> the layer that owns it (the innermost layer holding it)."""
    out: dict[str, Any] = {}
    for lyr in layers(model):
        for v in lyr.weights:
            if v.path.rpartition("/")[0] == lyr.path:
                out[v.path] = lyr
    return out


def heads_of(path: str, config: dict[str, object]) -> int:
    """How many heads share the ``(r → h)`` factor of Keras's LoRA on ``path`` (1: a plain LoRA)."""
    key = _HEADS.get(path.rpartition(".")[2])
    return int(config[key]) if key else 1


def lora_structure(
    path: str, config: dict[str, object], r: int, alpha: float, out_features: int
) -> tuple[int, float, torch.Tensor | None]:
    """Canonical rank, alpha and ``B`` mask of Keras's LoRA of rank ``r`` on ``path``: per head of the
    query/key/value projections, block-diagonal (see the module docstring)."""
    u = heads_of(path, config)
    if u == 1:
        return r, alpha, None
    h = out_features // u
    mask = torch.zeros(out_features, u * r, dtype=torch.float64)
    for j in range(u):
        mask[j * h : (j + 1) * h, j * r : (j + 1) * r] = 1
    return u * r, u * alpha, mask


def lora_fill(path: str, config: dict[str, object], B: torch.Tensor) -> torch.Tensor:
    """``B`` with every head's block equal to the first (Keras shares ``lora_kernel_b`` across heads)."""
    u = heads_of(path, config)
    if u == 1:
        return B
    h, r = B.shape[0] // u, B.shape[1] // u
    out = torch.zeros_like(B)
    for j in range(u):
        out[j * h : (j + 1) * h, j * r : (j + 1) * r] = B[:h, :r]
    return out


@functools.lru_cache(maxsize=64)
def _layout_of(frozen: tuple) -> tuple[dict, tuple[str, ...], dict]:
    model = backbone(dict(frozen), torch.float32)
    owners = owner(model)
    shapes: dict[str, tuple[int, ...]] = {}
    paths: list[str] = []
    facts: dict[str, dict] = {}
    for v in model.weights:
        name, leaf = param_name(v)
        layer = owners[v.path]
        value = torch.zeros(tuple(v.shape))
        shapes[name] = tuple(to_canonical(layer, leaf, value).shape)
        if leaf not in ("kernel", "embeddings") or not is_targetable(layer):
            continue
        path = module_path(layer)
        if getattr(layer, "bias", None) is not None:  # keras-hub's Llama has none
            raise ValueError(f"{path}: a projection bias is not modelled")
        paths.append(path)
        facts[path] = dict(
            kind="embedding" if leaf == "embeddings" else "linear",
            fan_in_fan_out=False,
            out_in=shapes[name],
            bias=False,
            padding_idx=None,
            conv=None,
        )
    return shapes, tuple(paths), facts


def layout(config: dict[str, object]) -> tuple[dict, tuple[str, ...], dict]:
    """Parameter shapes (suite names, canonical layout), targetable paths and per-module facts."""
    return _layout_of(tuple(sorted(config.items())))


def saveable(config: dict[str, object]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Modules ``modules_to_save`` may name: the projections (a trained copy of a torch module the
    backbone calls through; a norm scale is read by Keras directly, so a copy of it would not be)."""
    shapes, paths, facts = layout(config)
    return {p: {"weight": shapes[f"{p}.weight"]} for p in paths if facts[p]["kind"] == "linear"}


def draw_config(draw: st.DrawFn, min_layers: int) -> dict[str, object]:
    g = draw_gqa_dims(draw, min_layers)
    return dict(
        vocabulary_size=g["vocab"],
        num_layers=g["layers"],
        num_query_heads=g["heads"],
        num_key_value_heads=g["kv_heads"],
        hidden_dim=g["hidden"],
        intermediate_dim=g["intermediate"],
    )


def draw_inputs(
    draw: st.DrawFn, gen: torch.Generator, config: dict[str, object], dtype: torch.dtype, device: str
) -> dict[str, torch.Tensor]:
    from properties.strategies import _ints

    batch, seq = draw(_ints(1, 3), label="batch"), draw(_ints(1, 5), label="seq")
    pads = [draw(_ints(0, seq - 1), label="right pad") for _ in range(batch)]
    ids = torch.randint(0, int(config["vocabulary_size"]), (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    for row, k in enumerate(pads):
        if k:
            mask[row, seq - k :] = 0
    return {"token_ids": ids.to(device), "padding_mask": mask.to(device)}


def deep_paths(config: dict[str, object], paths: tuple[str, ...]) -> list[str]:
    last = int(config[LAYERS_KEY]) - 1
    return [p for p in paths if p.startswith(f"transformer_layer_{last}.")]


def fewer_layers(config: dict[str, object]) -> dict[str, object]:
    return one_layer_fewer(config, LAYERS_KEY)


# -- the torch view the reference adapts --------------------------------------------------------------


class Flat:
    """How a targetable Keras layer's input and output map to the canonical ``(..., in)`` / ``(..., out)``."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.embedding = "Embedding" in type(layer).__name__
        self.axes = (0, 0) if self.embedding else kernel_axes(layer)

    def flat_in(self, x: torch.Tensor) -> torch.Tensor:
        nc = self.axes[0]
        return x if self.embedding or nc == 1 else x.reshape(*x.shape[: x.dim() - nc], -1)

    def flat_out(self, y: torch.Tensor) -> torch.Tensor:
        no = self.axes[1]
        return y if self.embedding or no == 1 else y.reshape(*y.shape[: y.dim() - no], -1)

    def unflat_in(self, x: torch.Tensor) -> torch.Tensor:
        nc = self.axes[0]
        if self.embedding or nc == 1:
            return x
        return x.reshape(*x.shape[:-1], *tuple(self.layer._kernel.shape[:nc]))

    def unflat_out(self, y: torch.Tensor) -> torch.Tensor:
        nc, no = self.axes
        if self.embedding or no == 1:
            return y
        return y.reshape(*y.shape[:-1], *tuple(self.layer._kernel.shape[nc:]))


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` under ``root``, creating plain containers on the way."""
    parent = root
    *heads, leaf = path.split(".")
    for part in heads:
        child = parent._modules.get(part)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    parent.add_module(leaf, module)


class KerasLlama(nn.Module):
    """A keras-hub ``LlamaBackbone`` whose targetable layers compute through torch modules at their
    paths (so ``lora_core`` can wrap them) and whose norm scales are registered as parameters (the
    same tensors Keras reads). ``forward(token_ids, padding_mask)`` returns the backbone's output."""

    def __init__(self, config: dict[str, object], dtype: torch.dtype) -> None:
        super().__init__()
        model = backbone(config, dtype)
        object.__setattr__(self, "backbone", model)  # not a child: its variables are not ours
        object.__setattr__(self, "config", dict(config))
        object.__setattr__(self, "dtype", dtype)
        owners = owner(model)
        rest = []
        for v in model.weights:
            name, leaf = param_name(v)
            layer = owners[v.path]
            path = name.rpartition(".")[0]
            if not (is_targetable(layer) and leaf in ("kernel", "embeddings")):
                rest.append((path, name.rpartition(".")[2], v))
                continue
            if leaf == "embeddings":
                proxy: nn.Module = nn.Embedding(*tuple(v.shape), dtype=dtype)
            else:
                out_f, in_f = to_canonical(layer, leaf, torch.zeros(tuple(v.shape))).shape
                proxy = nn.Linear(in_f, out_f, bias=False, dtype=dtype)  # layout(): no biases
            _attach(self, path, proxy)
            self._redirect(layer, path)
        for path, leaf, v in rest:  # norm scales, the untied output table: Keras's own tensors
            if path not in dict(self.named_modules()):
                _attach(self, path, nn.Module())
            self.get_submodule(path).register_parameter(leaf, v._value)

    def _redirect(self, layer: Any, path: str) -> None:
        flat = Flat(layer)

        def call(inputs: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if kwargs.get("reverse"):
                raise NotImplementedError("the reverse (output) embedding is not part of the backbone")
            y = self.get_submodule(path)(flat.flat_in(inputs))
            return flat.unflat_out(y)

        layer.__dict__["call"] = call

    def forward(self, token_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        return self.backbone({"token_ids": token_ids, "padding_mask": padding_mask})

    def __deepcopy__(self, memo: dict) -> KerasLlama:
        """A fresh backbone (Keras layers do not deep-copy) holding this model's values."""
        with torch.device(next(self.parameters()).device):
            twin = KerasLlama(self.config, self.dtype)
        with torch.no_grad():
            for (_, mine), (_, theirs) in zip(self.named_parameters(), twin.named_parameters(), strict=True):
                theirs.copy_(mine)
        return twin


def construct(config: dict[str, object], dtype: torch.dtype) -> nn.Module:
    if torch.empty(0).device.type == "meta":
        raise ValueError("a Keras backbone cannot be built on the meta device: use layout()")
    return KerasLlama(config, dtype).eval()


def save_pretrained(model: nn.Module, config: dict[str, object], directory: str) -> None:
    """``torch.save`` of the torch view's state dict, and the config (the reference's merged model)."""
    save_state_and_config(model, config, directory, CONFIG_FILE, WEIGHTS_FILE)


def from_pretrained(directory: str, dtype: torch.dtype) -> nn.Module:
    return load_state_and_config(directory, construct, dtype, CONFIG_FILE, WEIGHTS_FILE)
