"""microsoft/LoRA's ``loralib`` (0.1.2) as a conformance target.

loralib's layers subclass the torch layers and have no merge API: ``.eval()`` merges and ``.train()``
unmerges when ``merge_weights=True``. The protocol separates "eval forward" from "merge", so every layer
is built with ``merge_weights=False`` (mode switches then never touch the weights) and the handle turns
``merge_weights`` on only around the mode switch that *is* the operation: ``merge()`` is ``eval()``,
``unmerge()`` is ``train()``, both running loralib's own code. A forward never changes merge state,
whatever its ``train`` flag; a merged layer in train mode keeps its merged weights, as in PEFT.

Layouts: Linear and Embedding factors are canonical (Embedding ``A (r, num)``, ``B (dim, r)``). loralib's
conv LoRA is one matrix product ``lora_B (out/g*k, r*k) @ lora_A (r*k, in*k)`` viewed as the weight
``(out, in/g, k, ...)``. For a square 2-D kernel the canonical factors map exactly (see
:func:`_conv_factors`): ``A`` is reshaped to ``(r*q, in*k)`` and ``B`` becomes ``kron(B_dense, I_q)``
with ``q = N / (in*k)`` rows of loralib's product per output channel, padded with zero columns/rows. The
products gain only exact zero terms. Conv1d and Conv3d with a kernel > 1 cannot work at all: their
product has ``k`` times too many (Conv1d) or ``1/k`` as many (Conv3d) elements for the weight view, so
those builds raise (a loralib bug, reported as an error, never skipped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from properties.spec import CONV_KINDS, DTYPES, LayerSpec
from properties.targets._library import (
    OneAdapterHandle,
    base_weights,
    dense_groups,
    distribution_version,
    forward_in_mode,
    import_or_raise,
)
from properties.targets.protocol import Capabilities, Unsupported

PIP = "pip install loralib==0.1.2  (or: python scripts/envs.py create loralib)"


class LoralibMissing(ImportError):
    """loralib is not importable in this environment."""


class LoralibShapeBug(RuntimeError):
    """loralib's conv factor shapes cannot form the weight: its own forward and merge fail."""


def _loralib() -> Any:
    return import_or_raise(
        "loralib", LoralibMissing, f"the loralib target needs the `loralib` package: {PIP}"
    )


def _conv_factors(spec: LayerSpec, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical conv factors in loralib's layout, with ``B_l @ A_l`` viewing exactly as ``B∘A``.

    Write the canonical delta as ``D = B_dense @ A.flatten(1)``, shape ``(out, N)`` with
    ``N = in/g * k^d``. loralib's product ``M`` is ``(out/g*k, in*k)`` and is viewed row-major as the
    weight, so row ``o`` of ``D`` is ``q = N / (in*k)`` consecutive rows of ``M``. Then
    ``M = kron(B_dense, I_q) @ A.reshape(r*q, in*k)``, which fits loralib's ``(out/g*k, r*k)`` and
    ``(r*k, in*k)`` factors when ``q`` is a whole number no larger than ``k``.
    """
    c = spec.conv
    k, g = c.kernel_size[0], c.groups
    out, r = B.shape[0], A.shape[0]
    in_ch = spec.weight.shape[1] * g
    n, row = math.prod(spec.weight.shape[1:]), in_ch * k
    if (out // g) * k * row != spec.weight.numel():
        raise LoralibShapeBug(
            f"loralib {spec.kind}(kernel_size={k}): lora_B @ lora_A is ({out // g * k}, {row}), "
            f"{out // g * k * row} elements, but the weight {tuple(spec.weight.shape)} has "
            f"{spec.weight.numel()}; loralib's own forward and eval() fail in .view()"
        )
    if n % row or (out // g) * k != out * (n // row):
        raise Unsupported(
            f"loralib conv with groups={g} and kernel {k}: a row of lora_B @ lora_A straddles two output "
            "channels, so the canonical grouped delta has no exact copy into loralib's factors"
        )
    q = n // row
    b_dense = dense_groups(B.reshape(out, -1), g)
    A_l = A.new_zeros((r * k, row))
    B_l = B.new_zeros((out // g * k, r * k))
    A_l[: r * q] = A.reshape(r * q, row)
    B_l[:, : r * q] = torch.kron(b_dense, torch.eye(q, dtype=B.dtype, device=B.device))
    return A_l, B_l


class LoralibHandle(OneAdapterHandle):
    """One loralib layer; merge state is loralib's own ``merged`` flag."""

    def _base(self) -> nn.Module:
        return self.layer.conv if self.spec.kind in CONV_KINDS else self.layer

    def _switch(self, train: bool) -> None:
        """Run loralib's ``train(mode)`` with ``merge_weights`` on: that is its merge/unmerge."""
        self.layer.merge_weights = True
        try:
            self.layer.train(train)
        finally:
            self.layer.merge_weights = False
            self.layer.train(False)

    def forward(
        self, x: torch.Tensor, *, train: bool = False, adapter_names: Sequence[str] | None = None
    ) -> torch.Tensor:
        if adapter_names is not None:
            raise Unsupported("loralib has no mixed-batch forward")
        return forward_in_mode(self.layer, x, train)  # merge_weights is off: only dropout changes

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        if safe:
            raise Unsupported("loralib has no safe merge")
        if adapter_names is not None and list(adapter_names) != [self.name]:
            raise Unsupported("loralib has one adapter per layer: it merges that one or nothing")
        self._switch(train=False)

    def unmerge(self) -> None:
        self._switch(train=True)

    def set_active(self, names: Sequence[str]) -> None:
        raise Unsupported("loralib has one always-active adapter per layer")

    def set_enabled(self, enabled: bool) -> None:
        raise Unsupported("loralib cannot disable an adapter")

    def set_scale(self, name: str, scale: float) -> None:
        raise Unsupported("loralib has no scale API (scaling is alpha / r, fixed at construction)")

    def scale_layer(self, factor: float) -> None:
        raise Unsupported("loralib has no scale API")

    def unscale_layer(self, factor: float | None = None) -> None:
        raise Unsupported("loralib has no scale API")

    def weights(self) -> dict[str, torch.Tensor]:
        return base_weights(self._base(), self.spec)

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        raise Unsupported("loralib has no public delta-weight function")

    def merge_and_unload(self) -> nn.Module:
        raise Unsupported("loralib has no merge-and-unload: eval() merges but the layer stays a LoRA layer")


class LoralibTarget:
    """microsoft/LoRA ``loralib``: Linear (with fan_in_fan_out), Embedding, Conv1d/2d/3d; one adapter."""

    name = "loralib"

    def version(self) -> str:
        _loralib()
        return distribution_version("loralib")

    def capabilities(self) -> Capabilities:
        _loralib()
        v = distribution_version("loralib")
        return Capabilities(
            layers=frozenset({"linear", "embedding", "conv1d", "conv2d", "conv3d"}),
            dtypes=frozenset(DTYPES.values()),
            operations=frozenset({"merge", "unmerge", "train_forward"}),
            options=frozenset(
                {"dropout", "fan_in_fan_out", "padding_idx", "conv_groups", "conv_dilation"}
                | {"padding_mode", "padding_same"}
            ),
            notes={
                "mha": f"loralib {v}: no MultiheadAttention layer (MergedLinear is a fused QKV Linear)",
                "multi_adapter": f"loralib {v}: one adapter per layer",
                "rslora": f"loralib {v}: scaling is alpha / r only",
                "dora": f"loralib {v}: no DoRA",
                "lora_bias": f"loralib {v}: no LoRA bias",
                "safe_merge": f"loralib {v}: merging is eval(); there is no finiteness check",
                "merge_subset": f"loralib {v}: one adapter per layer",
                "exact_unmerge": f"loralib {v}: train() subtracts the delta in floating point",
                "disable": f"loralib {v}: adapters cannot be disabled",
                "set_active": f"loralib {v}: one always-active adapter",
                "set_scale": f"loralib {v}: scaling is fixed at construction",
                "scale_layer": f"loralib {v}: scaling is fixed at construction",
                "mixed_batch": f"loralib {v}: no per-row adapters",
                "merge_and_unload": f"loralib {v}: eval() merges in place; no unload",
                "delta_weight": f"loralib {v}: no public delta-weight function",
                "dropout": "Linear applies it to the LoRA input; Embedding has none (p > 0 is refused); "
                "conv layers accept lora_dropout and never apply it",
                "conv": "loralib needs a square kernel (an int kernel_size); conv groups must divide it",
            },
        )

    def build(self, spec: LayerSpec) -> LoralibHandle:
        lora = _loralib()
        if len(spec.adapters) != 1:
            raise Unsupported("loralib has one adapter per layer")
        a = spec.adapters[0]
        if a.use_rslora or a.use_dora or a.bias is not None:
            raise Unsupported("loralib has no rsLoRA, DoRA or LoRA bias")
        if spec.fan_in_fan_out and spec.kind != "linear":
            raise Unsupported("fan_in_fan_out applies to linear layers only")
        kw = {"dtype": spec.dtype, "device": spec.device, "merge_weights": False}
        bias = spec.base_bias is not None
        if spec.kind == "linear":
            out_f, in_f = spec.weight.shape
            layer = lora.Linear(
                in_f, out_f, r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                fan_in_fan_out=spec.fan_in_fan_out, bias=bias, **kw,
            )  # fmt: skip
            weight, A, B = (spec.weight.T if spec.fan_in_fan_out else spec.weight), a.A, a.B
        elif spec.kind == "embedding":
            if a.dropout > 0:
                raise Unsupported("loralib.Embedding has no LoRA dropout")
            layer = lora.Embedding(
                *spec.weight.shape, r=a.r, lora_alpha=a.alpha, padding_idx=spec.padding_idx, **kw
            )
            weight, A, B = spec.weight, a.A, a.B
        elif spec.kind in CONV_KINDS:
            layer, weight, A, B = self._conv(lora, spec, bias, kw)
        else:
            raise Unsupported("loralib has no MultiheadAttention layer")
        base = layer.conv if spec.kind in CONV_KINDS else layer
        with torch.no_grad():
            base.weight.copy_(weight)
            if bias:
                base.bias.copy_(spec.base_bias)
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        layer.train(False)
        return LoralibHandle(spec, layer)

    def _conv(self, lora: Any, spec: LayerSpec, bias: bool, kw: dict) -> tuple[nn.Module, Any, Any, Any]:
        c = spec.conv
        a = spec.adapters[0]
        if len(set(c.kernel_size)) != 1:
            raise Unsupported(f"loralib conv needs a square kernel (int kernel_size), got {c.kernel_size}")
        A_l, B_l = _conv_factors(spec, a.A, a.B)
        cls = {"conv1d": lora.Conv1d, "conv2d": lora.Conv2d, "conv3d": lora.Conv3d}[spec.kind]
        layer = cls(
            spec.weight.shape[1] * c.groups, spec.weight.shape[0], c.kernel_size[0],
            r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, stride=c.stride, padding=c.padding,
            dilation=c.dilation, groups=c.groups, padding_mode=c.padding_mode, bias=bias, **kw,
        )  # fmt: skip
        return layer, spec.weight, A_l, B_l


TARGET = LoralibTarget()
