"""torchtune's Llama as an architecture of the model half: ``llama3(...)`` from torchtune's component
builders, with tiny dimensions, built in memory (``lora_llama3`` is its LoRA twin).

torchtune states LoRA per *kind* of module, not per module: ``lora_attn_modules`` (a subset of
``q_proj``, ``k_proj``, ``v_proj``, ``output_proj``, in every layer), ``apply_lora_to_mlp`` (``w1``,
``w2``, ``w3`` in every layer) and ``apply_lora_to_output``, with one ``lora_rank`` and one
``lora_alpha`` for the whole model (``get_merged_lora_ckpt(state_dict, rank, alpha)`` takes one pair
too). So this architecture draws its targets as such groups and one rank and alpha per adapter
(:func:`capabilities`); the token embedding cannot carry a LoRA in torchtune.

The forward takes ``tokens`` only: torchtune's mask argument is a full (batch, seq, seq) mask, not a
padding mask, so no padding is drawn. The family needs ``torchtune`` (``python scripts/envs.py create
torchtune``). ``torchtune.training`` does not import with the torchao the env pins (it asks torchao
for ``int4_weight_only``), so nothing here imports it: the default dtype is set by hand while building,
as ``training.set_default_dtype`` does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from hypothesis import strategies as st
from torch import nn

from properties.models.families import draw_gqa_dims, narrowed, one_layer_fewer
from properties.models.protocol import ModelCapabilities
from properties.targets.protocol import Capabilities

ARCHITECTURE = "torchtune_llama"
LAYERS_KEY = "num_layers"
ATTENTION = ("q_proj", "k_proj", "v_proj", "output_proj")
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def missing() -> str | None:
    if importlib.util.find_spec("torchtune") is None:
        return "the torchtune_llama architecture needs torchtune (python scripts/envs.py create torchtune)"
    return None


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """What ``torchtune.training.set_default_dtype`` does (that module does not import here)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def construct(config: dict[str, object], dtype: torch.dtype) -> nn.Module:
    """The base model: ``llama3(**config)`` built under ``dtype`` as torchtune's recipes build it."""
    from torchtune.models.llama3._component_builders import llama3

    with default_dtype(dtype):
        return llama3(**config)


def construct_lora(
    config: dict[str, object], dtype: torch.dtype, groups: set[str], rank: int, alpha: float, dora: bool
) -> nn.Module:
    """``lora_llama3`` with LoRA on the drawn groups."""
    from torchtune.models.llama3._component_builders import lora_llama3

    with default_dtype(dtype):
        return lora_llama3(
            [g for g in ATTENTION if g in groups],
            apply_lora_to_mlp="mlp" in groups,
            apply_lora_to_output="output" in groups,
            lora_rank=rank,
            lora_alpha=alpha,
            use_dora=dora,
            **config,
        )


def draw_config(draw: st.DrawFn, min_layers: int) -> dict[str, object]:
    g = draw_gqa_dims(draw, min_layers)
    return dict(
        vocab_size=g["vocab"],
        num_layers=g["layers"],
        num_heads=g["heads"],
        num_kv_heads=g["kv_heads"],
        embed_dim=g["hidden"],
        max_seq_len=16,
        intermediate_dim=g["intermediate"],
    )


def draw_inputs(
    draw: st.DrawFn, gen: torch.Generator, config: dict[str, object], dtype: torch.dtype, device: str
) -> dict[str, torch.Tensor]:
    from properties.strategies import _ints

    batch, seq = draw(_ints(1, 3), label="batch"), draw(_ints(1, 5), label="seq")
    tokens = torch.randint(0, int(config["vocab_size"]), (batch, seq), generator=gen)
    return {"tokens": tokens.to(device)}


def group_of(path: str) -> str | None:
    """The torchtune switch that puts a LoRA on ``path`` (None: torchtune cannot)."""
    leaf = path.rpartition(".")[2]
    if leaf in ATTENTION:
        return leaf
    if leaf in ("w1", "w2", "w3"):
        return "mlp"
    return "output" if path == "output" else None


def capabilities(caps: Capabilities) -> ModelCapabilities:
    """What is drawn on this architecture for a target with ``caps``: torchtune's LoRA switches, each
    adapting a whole group (:func:`group_of`), and one rank and alpha for the model."""
    return narrowed(caps, group_of=group_of, uniform_rank=True)


def deep_paths(config: dict[str, object], paths: tuple[str, ...]) -> list[str]:
    last = int(config[LAYERS_KEY]) - 1
    return [p for p in paths if p.startswith(f"layers.{last}.") and group_of(p) is not None]


def fewer_layers(config: dict[str, object]) -> dict[str, object]:
    return one_layer_fewer(config, LAYERS_KEY)


def save_pretrained(model: nn.Module, config: dict[str, object], directory: str) -> None:
    """torchtune has no ``save_pretrained``: the state dict as safetensors plus the builder's config."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))


def from_pretrained(directory: str, dtype: torch.dtype) -> nn.Module:
    from safetensors.torch import load_file

    config = json.loads((Path(directory) / CONFIG_FILE).read_text())
    model = construct(config, dtype)
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)), strict=True)
    return model
