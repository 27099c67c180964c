"""What a property hands to a target: the exact layer to build, in one canonical layout.

Every tensor in a spec is already rounded to ``spec.dtype``; the float64 oracle upcasts those same
rounded values, so target and oracle see identical inputs. Layouts follow PEFT, because that is
what users know:

=================  =====================  =====================  ==============  ===========
kind               base ``weight``        ``A``                  ``B``           bias / mag.
=================  =====================  =====================  ==============  ===========
linear             (out, in)              (r, in)                (out, r)        (out,)
embedding          (num_emb, dim)         (r, num_emb)           (dim, r)        (dim,)
conv1d/2d/3d       (out, in/g, *k)        (r, in/g, *k)          (out, r/g, *1)  (out,)
mha (in_proj)      (3E, E)                (r, E)                 (3E, r)         --
mha (out_proj)     (E, E)                 ``out_A`` (r, E)       ``out_B`` (E, r) --
=================  =====================  =====================  ==============  ===========

``linear`` with ``fan_in_fan_out=True`` is GPT-2's Conv1D: the spec still holds the canonical
``(out, in)`` weight and the target stores its transpose. Conv LoRA follows the base conv: ``A`` is a
conv with the base's kernel, stride, padding, dilation, groups and padding mode; ``B`` is a grouped
1x1 conv, so the delta ``B∘A`` has exactly the base weight's shape and merging is exact algebra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

LayerKind = Literal["linear", "embedding", "conv1d", "conv2d", "conv3d", "mha"]
LAYER_KINDS: tuple[LayerKind, ...] = ("linear", "embedding", "conv1d", "conv2d", "conv3d", "mha")
CONV_KINDS = ("conv1d", "conv2d", "conv3d")
HQQ_KINDS: tuple[str, ...] = ("hqq_8bit", "hqq_4bit", "hqq_3bit", "hqq_2bit", "hqq_1bit")
QUANT_KINDS: tuple[str, ...] = ("bnb_int8", "bnb_nf4", "bnb_fp4", "torchao_int8", *HQQ_KINDS, "torchao_nf4")
"""Linear layers on a quantized base (``properties/quantized``): run only when named in ``--layers``."""

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

BASE_ROW = "__base__"
"""Mixed-batch name for rows that must see no adapter at all (PEFT's convention)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ConvOptions:
    """Options of the base conv; the LoRA ``A`` conv uses the same ones."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str  # ints, or "same" / "valid"
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"  # zeros | reflect | replicate | circular


@dataclass(frozen=True)
class QuantSpec:
    """How the base weight of a quantized linear layer is stored (``kind`` is one of ``QUANT_KINDS``).

    ``block``: elements per scale (bnb 4-bit blocksize, HQQ group size; 0 = one scale per output row);
    ``bits``: code width; ``double_quant``: bnb's 8-bit coding of the 4-bit block scales; ``optimize``:
    HQQ's zero-point optimiser (``optimize=True``, its default) instead of plain min/max;
    ``scale_block``: torchao NF4's ``scaler_block_size`` (block scales per double-quantized group)."""

    kind: str
    bits: int
    block: int = 0
    double_quant: bool = False
    optimize: bool = False
    scale_block: int = 0

    @property
    def label(self) -> str:
        """Short name for reports, e.g. ``nf4 b64 dq`` or ``int8 per-row``."""
        if self.kind in ("bnb_nf4", "bnb_fp4"):
            return f"{self.kind[4:]} b{self.block}" + (" dq" if self.double_quant else "")
        if self.kind in HQQ_KINDS:
            return f"hqq {self.bits}bit g{self.block}" + (" opt" if self.optimize else "")
        if self.kind == "torchao_nf4":
            return f"torchao nf4 b{self.block} s{self.scale_block}"
        return f"{self.kind.split('_', 1)[1]} per-row" if self.kind == "bnb_int8" else "torchao int8 per-row"


@dataclass(frozen=True, eq=False)
class AdapterSpec:
    """One named adapter with the exact factors to load (canonical layout, rounded to the dtype)."""

    name: str
    r: int
    alpha: float
    A: torch.Tensor
    B: torch.Tensor
    use_rslora: bool = False
    use_dora: bool = False
    dropout: float = 0.0
    bias: torch.Tensor | None = None  # LoRA bias, added to the base bias (needs a base bias to merge)
    magnitude: torch.Tensor | None = None  # DoRA magnitude, one per output feature
    out_A: torch.Tensor | None = None  # mha only: LoRA on out_proj
    out_B: torch.Tensor | None = None

    @property
    def scaling(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("A", "B", "bias", "magnitude", "out_A", "out_B")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


class NamedAdapters:
    """Adapter lookup shared by a layer's spec and a model's: ``adapters`` in order, ``active`` (empty:
    all of them)."""

    adapters: tuple
    active: tuple[str, ...]

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.adapters)

    @property
    def active_adapters(self) -> tuple[str, ...]:
        return self.active or self.adapter_names

    def adapter(self, name: str):
        for a in self.adapters:
            if a.name == name:
                return a
        raise KeyError(name)


@dataclass(frozen=True, eq=False)
class LayerSpec(NamedAdapters):
    """A base layer plus its adapters, everything exact. Targets build from this and nothing else."""

    kind: LayerKind
    dtype: torch.dtype
    weight: torch.Tensor  # canonical layout (see module docstring); mha: in_proj_weight
    adapters: tuple[AdapterSpec, ...]
    base_bias: torch.Tensor | None = None  # mha: in_proj_bias
    fan_in_fan_out: bool = False  # linear only: GPT-2 Conv1D storage (in, out)
    conv: ConvOptions | None = None
    padding_idx: int | None = None  # embedding only
    num_heads: int = 1  # mha only
    out_weight: torch.Tensor | None = None  # mha only: out_proj.weight (E, E)
    out_bias: torch.Tensor | None = None  # mha only: out_proj.bias
    device: str = "cpu"
    seed: int = 0  # seeds torch before train-mode forwards so dropout masks replay
    active: tuple[str, ...] = field(default=())  # active adapters; empty means all, in order
    quant: QuantSpec | None = None  # kind "linear" on a quantized base (``weight`` is the input to quantize)

    @property
    def options(self) -> frozenset[str]:
        """The layer options this spec uses; a target must declare them all to be handed it."""
        opts: set[str] = set()
        if len(self.adapters) > 1:
            opts.add("multi_adapter")
        for a in self.adapters:
            opts |= {o for o, on in (("rslora", a.use_rslora), ("dora", a.use_dora)) if on}
            if a.bias is not None:
                opts.add("lora_bias")
            if a.dropout > 0:
                opts.add("dropout")
        if self.fan_in_fan_out:
            opts.add("fan_in_fan_out")
        if self.padding_idx is not None:
            opts.add("padding_idx")
        if self.conv is not None:
            c = self.conv
            if c.groups > 1:
                opts.add("conv_groups")
            if any(d > 1 for d in c.dilation):
                opts.add("conv_dilation")
            if c.padding_mode != "zeros":
                opts.add("padding_mode")
            if isinstance(c.padding, str):
                opts.add("padding_same")
        return frozenset(opts)

    def with_adapters(self, adapters: tuple[AdapterSpec, ...]) -> LayerSpec:
        return replace(self, adapters=adapters)

    def base_tensors(self) -> dict[str, torch.Tensor]:
        """Base parameters by the names ``LayerHandle.weights()`` uses (canonical layout)."""
        if self.kind == "mha":
            out = {"in_proj_weight": self.weight, "out_proj.weight": self.out_weight}
            if self.base_bias is not None:
                out["in_proj_bias"] = self.base_bias
            if self.out_bias is not None:
                out["out_proj.bias"] = self.out_bias
            return out
        out = {"weight": self.weight}
        if self.base_bias is not None:
            out["bias"] = self.base_bias
        return out


@dataclass(frozen=True, eq=False)
class Example:
    """A spec plus the input it is run on. ``x`` is float for all kinds but embedding (int64 ids).

    Shapes: linear ``(*batch, in)``; embedding ``(*batch,)``; convNd ``(N, C, *spatial)``;
    mha ``(N, L, E)`` (batch_first, self-attention: query = key = value = x).
    """

    spec: LayerSpec
    x: torch.Tensor

    def describe(self) -> str:
        """A compact, human-readable account of the example for failure messages."""
        s = self.spec
        lines = [
            f"kind={s.kind} dtype={dtype_name(s.dtype)} weight={tuple(s.weight.shape)} "
            f"bias={s.base_bias is not None} x={tuple(self.x.shape)} seed={s.seed}"
        ]
        if s.fan_in_fan_out:
            lines.append("fan_in_fan_out=True")
        if s.conv is not None:
            lines.append(f"conv={s.conv}")
        if s.padding_idx is not None:
            lines.append(f"padding_idx={s.padding_idx}")
        if s.kind == "mha":
            lines.append(f"num_heads={s.num_heads}")
        for a in s.adapters:
            extras = [f"{k}={tuple(v.shape)}" for k, v in a.tensors().items()]
            lines.append(
                f"adapter {a.name!r}: r={a.r} alpha={a.alpha:g} rslora={a.use_rslora} dora={a.use_dora} "
                f"dropout={a.dropout:g} " + " ".join(extras)
            )
        if s.active:
            lines.append(f"active={list(s.active)}")
        if s.quant is not None:
            lines.append(f"quant={s.quant}")
        return "\n".join(lines)
