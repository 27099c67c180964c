"""Known bugs as predicates on examples: ``property layer dtype when EXPR  # reason`` in an xfails file.

A cell-level expected failure hides the whole cell, and whether a cell's few examples happen to draw a
known bug is chance: with another seed, profile or suite release other cells fail and listed ones pass.
A ``when`` line instead names the examples a known bug affects (``when dora and groups > 1``): the
runner sets those examples aside before the target sees them, counts them in the report, and tests
everything else in the cell as usual, so a new bug in the same cell still fails the gate.

``EXPR`` is a Python-like boolean expression over the example's features (:data:`FEATURES`), with
``and``/``or``/``not``, comparisons, ``in`` and literals; anything else is refused when the file is read.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable
from typing import Any

from properties import oracle
from properties.spec import Example, LayerSpec, dtype_name

FEATURES: dict[str, str] = {
    "kind": "layer kind: 'linear', 'embedding', 'conv1d', 'conv2d', 'conv3d', 'mha'",
    "dtype": "'float64', 'float32', 'bfloat16', 'float16'",
    "adapters": "number of adapters",
    "rank": "largest r of any adapter",
    "dora": "some adapter uses DoRA",
    "rslora": "some adapter uses rsLoRA",
    "lora_bias": "some adapter has a LoRA bias",
    "dropout": "largest dropout rate",
    "alpha_equals_rank": "some adapter has alpha == r",
    "base_bias": "the base layer has a bias",
    "dora_gain": "largest |m / ||W + s B A|| - 1| of any DoRA adapter and output feature (0 without DoRA; "
    "a model: of any targeted module)",
    "fan_in_fan_out": "GPT-2 Conv1D layout",
    "fan_in": "in_features / in_channels / num_embeddings / embed_dim",
    "fan_out": "out_features / out_channels / embedding_dim / embed_dim",
    "unbatched": "x has no batch dimension",
    "padding_idx": "the embedding has a padding_idx",
    "heads": "attention heads (1 outside mha)",
    "groups": "conv groups (1 outside conv)",
    "kernel": "largest conv kernel size (0 outside conv)",
    "kernel1": "every conv kernel size is 1",
    "stride": "largest conv stride (0 outside conv)",
    "dilation": "largest conv dilation (0 outside conv)",
    "padding": "largest explicit conv padding (0 for 'same' and outside conv)",
    "padding_same": "conv padding='same'",
    "padding_mode": "'zeros', 'reflect', 'replicate', 'circular' ('' outside conv)",
    "hostile": "planted hostile value: 'nan', 'inf', '-inf', 'overflow', or '' when none",
    "kernel_size": "conv kernel size as a tuple, e.g. (1, 1, 2) (() outside conv)",
}
# The model half's features ('' / False / 0 for a layer example; a model example's ``kind`` is 'model').
MODEL_FEATURES: dict[str, str] = {
    "architecture": "model: 'llama_tied', 'llama', 'gpt2', 'bert', 'unet', 'torchtune_llama', 'litgpt'",
    "tied_target": "model: a targeted module is tied to another module (embedding <-> lm_head)",
    "twin_untargeted": "model: a targeted module's tied twin is not targeted by the same adapters",
    "embedding_target": "model: an embedding module is targeted",
    "lm_head_target": "model: lm_head is targeted",
    "conv1d_target": "model: a GPT-2 Conv1D (fan_in_fan_out) module is targeted",
    "conv_target": "model: a conv module (UNet Conv2d) is targeted",
    "targets": "model: number of targeted modules",
    "layers": "model: hidden layers (unet: resnets per block)",
    "masked": "model: the attention mask has padding",
    "modules_to_save": "model: number of modules some adapter saves whole (modules_to_save)",
}
FEATURES.update(MODEL_FEATURES)
_LAYER_DEFAULTS = {"architecture": "", "targets": 0, "layers": 0, "modules_to_save": 0} | {
    k: False for k in MODEL_FEATURES if k not in ("architecture", "targets", "layers", "modules_to_save")
}

_NODES = (
    ast.Expression,
    ast.BoolOp,
    ast.And,
    ast.Or,
    ast.UnaryOp,
    ast.Not,
    ast.Compare,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.In,
    ast.NotIn,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.Tuple,
    ast.List,
)


@functools.cache
def compile_condition(expr: str) -> Callable[[dict[str, Any]], bool]:
    """Check ``expr`` and turn it into a predicate on a feature dict; ``ValueError`` says what is wrong."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"'when {expr}': not an expression ({e.msg})") from None
    for node in ast.walk(tree):
        if not isinstance(node, _NODES):
            raise ValueError(f"'when {expr}': {type(node).__name__} is not allowed")
        if isinstance(node, ast.Name) and node.id not in FEATURES:
            raise ValueError(f"'when {expr}': unknown feature {node.id!r}; known: {', '.join(FEATURES)}")
    code = compile(tree, f"<when {expr}>", "eval")
    return lambda features: bool(eval(code, {"__builtins__": {}}, features))  # noqa: S307 - checked above


def features(ex: Example, hostile: Any = None) -> dict[str, Any]:
    """The facts about an example that a ``when`` condition may use."""
    if hasattr(ex.spec, "architecture"):
        from properties.models.features import model_features

        return model_features(ex)
    s = ex.spec
    c = s.conv
    adapters = s.adapters
    w = s.weight
    if s.kind == "embedding":
        fan_in, fan_out, base_dims = w.shape[0], w.shape[1], 0
    elif s.kind == "mha":
        fan_in = fan_out = w.shape[1]
        base_dims = 2
    elif c is not None:
        fan_in, fan_out, base_dims = w.shape[1] * c.groups, w.shape[0], 1 + len(c.kernel_size)
    else:
        fan_in, fan_out, base_dims = w.shape[1], w.shape[0], 1
    return {
        "kind": s.kind,
        "dtype": dtype_name(s.dtype),
        "adapters": len(adapters),
        "rank": max((a.r for a in adapters), default=0),
        "dora": any(a.use_dora for a in adapters),
        "rslora": any(a.use_rslora for a in adapters),
        "lora_bias": any(a.bias is not None for a in adapters),
        "dropout": max((a.dropout for a in adapters), default=0.0),
        "alpha_equals_rank": any(a.alpha == a.r for a in adapters),
        "base_bias": s.base_bias is not None,
        "dora_gain": dora_gain(s),
        "fan_in_fan_out": s.fan_in_fan_out,
        "fan_in": fan_in,
        "fan_out": fan_out,
        "unbatched": ex.x.dim() <= base_dims,
        "padding_idx": s.padding_idx is not None,
        "heads": s.num_heads,
        "groups": c.groups if c else 1,
        "kernel": max(c.kernel_size) if c else 0,
        "kernel1": bool(c) and all(k == 1 for k in c.kernel_size),
        "stride": max(c.stride) if c else 0,
        "dilation": max(c.dilation) if c else 0,
        "padding": max(c.padding) if c and not isinstance(c.padding, str) else 0,
        "padding_same": bool(c) and c.padding == "same",
        "padding_mode": c.padding_mode if c else "",
        "hostile": getattr(hostile, "kind", "") or "",
        "kernel_size": tuple(c.kernel_size) if c else (),
        **_LAYER_DEFAULTS,
    }


def dora_gain(spec: LayerSpec) -> float:
    """How far DoRA rescales the base output, ``max |f - 1|`` with ``f = m / ||W + s B A||``: what an error in
    the base output is multiplied by when an implementation scales ``W x`` by ``f - 1`` (float64)."""
    gains = [
        (oracle.dora_factor(spec, a) - 1).abs().max().item()
        for a in spec.adapters
        if a.use_dora and a.magnitude is not None
    ]
    return max(gains, default=0.0)
