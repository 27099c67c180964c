"""The conv architecture of the model half: a tiny diffusers ``UNet2DConditionModel``, built in memory.

It is the smallest UNet diffusers accepts: one block (so no down/upsampler), 2 or 4 channels, group
norms of 1 or 2 groups, 1 or 2 resnets per block, and, as drawn, cross-attention transformer blocks in
the down/up blocks and the mid block. LoRA may target its ``Conv2d`` modules (``conv_in``, the resnets'
3x3 ``conv1``/``conv2`` and 1x1 ``conv_shortcut``, the attentions' 1x1 ``proj_in``/``proj_out``,
``conv_out``) and its ``Linear`` ones (time embedding, ``time_emb_proj``, attention ``to_q/k/v/out``,
feed-forward). The layer half's conv oracle and bound apply to each conv module as they are.

Its inputs are a latent ``sample`` (batch, channels, height, width), an integer ``timestep`` and the
cross-attention context ``encoder_hidden_states`` (batch, tokens, cross_attention_dim), all drawn.
The family needs ``diffusers`` (its env: ``python scripts/envs.py create diffusers``); without it the
cells are skipped with that reason.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from hypothesis import strategies as st
from torch import nn

from properties.models.families import one_layer_fewer

ARCHITECTURE = "unet"
LAYERS_KEY = "layers_per_block"


def missing() -> str | None:
    """Why the UNet cannot be built here, or None."""
    if importlib.util.find_spec("diffusers") is None:
        return "the unet architecture needs diffusers (python scripts/envs.py create diffusers)"
    return None


@functools.cache
def model_class() -> type[nn.Module]:
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    return diffusers.UNet2DConditionModel


def construct(config: dict[str, object], dtype: torch.dtype) -> nn.Module:
    """The model in ``dtype`` under the current device context (``meta`` for layouts). diffusers'
    ``from_pretrained(torch_dtype=...)`` also builds in float32 and then casts."""
    return model_class()(**config).to(dtype)


def draw_config(draw: st.DrawFn, min_layers: int) -> dict[str, object]:
    from properties.strategies import _choice, _ints

    layers = draw(_ints(min_layers, 2), label="layers per block")
    channels = 2 * draw(_ints(1, 2), label="channels/2")
    groups = draw(_ints(1, 2), label="norm groups")
    attention = draw(_choice((True, False)), label="cross-attention blocks")
    mid = draw(_choice((True, False)), label="mid block")
    return dict(
        sample_size=4,
        in_channels=draw(_ints(1, 2), label="in channels"),
        out_channels=draw(_ints(1, 2), label="out channels"),
        layers_per_block=layers,
        block_out_channels=(channels,),
        down_block_types=("CrossAttnDownBlock2D" if attention else "DownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D" if attention else "UpBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn" if mid else None,
        norm_num_groups=groups,
        cross_attention_dim=draw(_ints(1, 3), label="cross attention dim"),
        attention_head_dim=draw(_ints(1, 2), label="attention head dim") if channels % 2 == 0 else 1,
    )


def draw_inputs(
    draw: st.DrawFn, gen: torch.Generator, config: dict[str, object], dtype: torch.dtype, device: str
) -> dict[str, torch.Tensor]:
    """A latent, a timestep and a cross-attention context, rounded to ``dtype`` (values seeded)."""
    from properties.strategies import _ints

    batch = draw(_ints(1, 2), label="batch")
    # GroupNorm refuses a group of one value, so a 1x1 latent gets a second column.
    height = draw(_ints(1, 3), label="height")
    width = draw(_ints(2 if height == 1 else 1, 3), label="width")
    tokens = draw(_ints(1, 3), label="context tokens")
    timestep = draw(_ints(0, 999), label="timestep")
    sample = torch.randn(batch, int(config["in_channels"]), height, width, generator=gen, dtype=torch.float64)
    context = torch.randn(
        batch, tokens, int(config["cross_attention_dim"]), generator=gen, dtype=torch.float64
    )
    return {
        "sample": sample.to(device, dtype),
        "timestep": torch.tensor(timestep, device=device),
        "encoder_hidden_states": context.to(device, dtype),
    }


def deep_paths(config: dict[str, object], paths: tuple[str, ...]) -> list[str]:
    """Modules that exist only while the block has its last resnet/attention (a model with one
    resnet fewer per block has no such path)."""
    last = int(config[LAYERS_KEY]) - 1
    return [
        p
        for p in paths
        if p.startswith((f"down_blocks.0.resnets.{last}.", f"down_blocks.0.attentions.{last}."))
    ]


def fewer_layers(config: dict[str, object]) -> dict[str, object]:
    return one_layer_fewer(config, LAYERS_KEY)


def from_pretrained(directory: str, dtype: torch.dtype) -> nn.Module:
    return model_class().from_pretrained(directory, torch_dtype=dtype)


def save_pretrained(model: nn.Module, config: dict[str, object], directory: str) -> None:
    model.save_pretrained(directory)
