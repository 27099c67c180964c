"""litgpt's GPT (a Llama-style config) as an architecture of the model half: ``litgpt.model.GPT`` with a
tiny ``Config``, built in memory; ``litgpt.lora.GPT`` is its LoRA twin.

litgpt states LoRA per kind of module with one ``lora_r`` and ``lora_alpha`` for the model:
``lora_query`` / ``lora_key`` / ``lora_value`` (the fused ``attn.qkv``), ``lora_projection``
(``attn.proj`` in every layer), ``lora_mlp`` (``fc_1``, ``fc_2``, ``mlp.proj``) and ``lora_head``
(``lm_head``), drawn here as whole groups with one rank and alpha (:func:`capabilities`).

The fused ``attn.qkv`` (``LoRAQKVLinear``) puts one rank-r pair on each enabled block of rows (q, k, v;
which ones is drawn into the config as ``lora_qkv``). In canonical form that is one LoRA of the fused
weight of rank ``n·r`` (``n`` enabled blocks) and alpha ``n·alpha`` (the same scaling): ``A`` stacks the
blocks' ``A``, and ``B`` is block-diagonal, each block's ``B`` in its rows and its ``r`` columns, zero
elsewhere (:func:`lora_structure`). The layer half's oracle and bound apply to it unchanged.

The forward takes ``idx`` (token ids, no mask: litgpt's GPT is causal and has no padding mask). The
family needs ``litgpt`` (``python scripts/envs.py create litgpt``).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import torch
from hypothesis import strategies as st
from torch import nn

from properties.models.families import load_state_and_config, narrowed, one_layer_fewer, save_state_and_config
from properties.models.protocol import ModelCapabilities
from properties.targets.protocol import Capabilities

ARCHITECTURE = "litgpt"
LAYERS_KEY = "n_layer"
GROUPS = {"projection": "lora_projection", "mlp": "lora_mlp", "head": "lora_head"}  # and "qkv"
CONFIG_FILE, WEIGHTS_FILE = "model_config.json", "lit_model.pth"


def missing() -> str | None:
    if importlib.util.find_spec("litgpt") is None:
        return "the litgpt architecture needs litgpt (python scripts/envs.py create litgpt)"
    # Imported here, before any example is drawn: importing litgpt (lightning) touches the global
    # ``random`` state, which Hypothesis flags when it happens inside a strategy.
    importlib.import_module("litgpt.lora")
    return None


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build under ``dtype``, as ``fabric.init_module()`` with that precision does."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _model_config(config: dict[str, object]) -> dict[str, object]:
    """The ``Config`` fields (``lora_qkv`` is the drawn q/k/v choice, not a model field)."""
    return {k: v for k, v in config.items() if k != "lora_qkv"}


def construct(config: dict[str, object], dtype: torch.dtype) -> nn.Module:
    from litgpt.config import Config
    from litgpt.model import GPT

    with default_dtype(dtype):
        return GPT(Config(**_model_config(config)))


def construct_lora(
    config: dict[str, object], dtype: torch.dtype, groups: set[str], rank: int, alpha: float
) -> nn.Module:
    from litgpt.lora import GPT, Config

    flags = {flag: g in groups for g, flag in GROUPS.items()}
    q, k, v = config["lora_qkv"] if "qkv" in groups else (False, False, False)
    flags.update(lora_query=q, lora_key=k, lora_value=v)
    with default_dtype(dtype):
        return GPT(Config(**_model_config(config), lora_r=rank, lora_alpha=alpha, lora_dropout=0.0, **flags))


def qkv_blocks(config: dict[str, object]) -> list[tuple[int, int]]:
    """The row ranges of the enabled q, k, v blocks of the fused ``attn.qkv`` weight, in order."""
    q = int(config["n_head"]) * int(config["head_size"])
    kv = int(config["n_query_groups"]) * int(config["head_size"])
    ranges = ((0, q), (q, q + kv), (q + kv, q + 2 * kv))
    return [rows for rows, on in zip(ranges, config["lora_qkv"], strict=True) if on]


def lora_structure(
    path: str, config: dict[str, object], r: int, alpha: float, out_features: int
) -> tuple[int, float, torch.Tensor | None]:
    """Canonical rank, alpha and ``B`` mask of the LoRA litgpt puts on ``path`` for ``lora_r=r``."""
    if not path.endswith(".attn.qkv"):
        return r, alpha, None
    blocks = qkv_blocks(config)
    mask = torch.zeros(out_features, len(blocks) * r, dtype=torch.float64)
    for j, (lo, hi) in enumerate(blocks):
        mask[lo:hi, j * r : (j + 1) * r] = 1
    return len(blocks) * r, len(blocks) * alpha, mask


def draw_config(draw: st.DrawFn, min_layers: int) -> dict[str, object]:
    from properties.strategies import _ints

    groups = draw(_ints(1, 2), label="query groups")
    heads = groups * draw(_ints(1, 2), label="heads per group")
    head_size = 2 * draw(_ints(1, 2), label="head size/2")  # RoPE rotates pairs
    vocab = draw(_ints(4, 24), label="vocab")
    qkv = tuple(draw(_ints(0, 1), label=f"lora on {b}") == 1 for b in "qkv")  # used where qkv is targeted
    return dict(
        n_layer=draw(_ints(min_layers, 3), label="layers"),
        n_head=heads,
        n_query_groups=groups,
        head_size=head_size,
        n_embd=heads * head_size,
        vocab_size=vocab,
        padded_vocab_size=vocab,
        block_size=16,
        intermediate_size=draw(_ints(1, 8), label="mlp width"),
        mlp_class_name="LLaMAMLP",
        norm_class_name="RMSNorm",
        bias=draw(_ints(0, 1), label="bias") == 1,
        rotary_percentage=1.0,
        parallel_residual=False,
        lora_qkv=qkv if any(qkv) else (True, False, False),
    )


def draw_inputs(
    draw: st.DrawFn, gen: torch.Generator, config: dict[str, object], dtype: torch.dtype, device: str
) -> dict[str, torch.Tensor]:
    from properties.strategies import _ints

    batch, seq = draw(_ints(1, 3), label="batch"), draw(_ints(1, 5), label="seq")
    return {"idx": torch.randint(0, int(config["vocab_size"]), (batch, seq), generator=gen).to(device)}


def group_of(path: str) -> str | None:
    """The litgpt switch that puts a LoRA on ``path`` (None: the embedding, which litgpt cannot)."""
    if path == "lm_head":
        return "head"
    if path.endswith(".attn.qkv"):
        return "qkv"
    if path.endswith(".attn.proj"):
        return "projection"
    if ".mlp." in path:
        return "mlp"
    return None


def capabilities(caps: Capabilities) -> ModelCapabilities:
    """What is drawn on this architecture for a target with ``caps``: litgpt's LoRA switches, each
    adapting a whole group (:func:`group_of`), and one rank and alpha for the model."""
    return narrowed(caps, group_of=group_of, uniform_rank=True)


def deep_paths(config: dict[str, object], paths: tuple[str, ...]) -> list[str]:
    last = int(config[LAYERS_KEY]) - 1
    return [p for p in paths if p.startswith(f"transformer.h.{last}.") and group_of(p) is not None]


def fewer_layers(config: dict[str, object]) -> dict[str, object]:
    return one_layer_fewer(config, LAYERS_KEY)


def save_pretrained(model: nn.Module, config: dict[str, object], directory: str) -> None:
    """litgpt's checkpoint layout: ``lit_model.pth`` (``torch.save`` of the state dict) and the config."""
    save_state_and_config(model, config, directory, CONFIG_FILE, WEIGHTS_FILE)


def from_pretrained(directory: str, dtype: torch.dtype) -> nn.Module:
    return load_state_and_config(directory, construct, dtype, CONFIG_FILE, WEIGHTS_FILE)
