"""What the library families (``unet``, ``torchtune_llama``, ``litgpt``) share, written once: each
family module differs only in its layer-count key and in how it names a module's LoRA group."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from properties.models.protocol import ModelCapabilities
from properties.targets.protocol import Capabilities


def narrowed(
    caps: Capabilities, *, group_of: Callable[[str], str | None], uniform_rank: bool
) -> ModelCapabilities:
    """``caps`` under a library's own configuration rule, stated as :class:`ModelCapabilities` fields.

    torchtune and litgpt switch LoRA on per kind of module (``group_of``) with one rank and alpha for
    the model. The rule belongs to the architecture, not to a target: the reference drawn on that
    architecture must draw what the library can express, or its cells would not be the library's.
    A target's own rules are kept; a target with its own ``group_of`` cannot be narrowed by another."""
    fields = {f.name: getattr(caps, f.name) for f in dataclasses.fields(Capabilities)}
    own = {k: getattr(caps, k, None) for k in ("targetable", "closure", "group_of")}
    if own["group_of"] is not None:
        raise ValueError("a target with its own group_of on a grouped architecture: two group rules")
    return ModelCapabilities(
        **fields,
        targetable=own["targetable"],
        closure=own["closure"],
        uniform_rank=uniform_rank or bool(getattr(caps, "uniform_rank", False)),
        group_of=lambda _arch, path: group_of(path),
    )


def one_layer_fewer(config: dict[str, object], layers_key: str) -> dict[str, object]:
    """``config`` with one block less (the model the ``fewer layers`` checks compare against)."""
    return {**config, layers_key: int(config[layers_key]) - 1}


def draw_gqa_dims(draw, min_layers: int) -> dict[str, int]:
    """The sizes of a tiny Llama-style decoder with grouped-query attention, drawn in one fixed order
    (kv heads, group, head size, vocabulary, layers, MLP width) so that every family built on them
    draws the same choices; each family renames them to its own config keys."""
    from properties.strategies import _ints

    kv = draw(_ints(1, 2), label="kv heads")
    heads = kv * draw(_ints(1, 2), label="GQA group")
    head_dim = 2 * draw(_ints(1, 2), label="head dim/2")  # RoPE rotates pairs
    vocab = draw(_ints(4, 24), label="vocab")
    layers = draw(_ints(min_layers, 3), label="layers")
    return dict(
        vocab=vocab,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        hidden=heads * head_dim,
        intermediate=draw(_ints(1, 8), label="mlp width"),
    )


def save_state_and_config(
    model: nn.Module, config: dict[str, object], directory: str, config_file: str, weights_file: str
) -> None:
    """``torch.save`` of the state dict beside the config as JSON: the checkpoint layout of a family
    whose library saves a plain state dict (litgpt's ``lit_model.pth``; the Keras view's reference)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / config_file).write_text(json.dumps(config))
    torch.save(model.state_dict(), out / weights_file)


def load_state_and_config(
    directory: str,
    construct: Callable[[dict[str, object], torch.dtype], nn.Module],
    dtype: torch.dtype,
    config_file: str,
    weights_file: str,
) -> nn.Module:
    """The model :func:`save_state_and_config` wrote, rebuilt from its config and loaded strictly."""
    config = json.loads((Path(directory) / config_file).read_text())
    model = construct(config, dtype)
    model.load_state_dict(torch.load(Path(directory) / weights_file, weights_only=True), strict=True)
    return model
