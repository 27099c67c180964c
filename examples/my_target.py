"""A complete, small target: a from-scratch LoRA Linear, pointed at the suite.

    lora-conformance run --target examples.my_target:TARGET --layers linear

Copy this file to test your own implementation: replace ``TinyLoraLinear`` with your layer and keep
the handle's methods as a thin translation. Declare only what you have in ``capabilities()``; the
suite skips the rest with a reason instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from properties.spec import LayerSpec
from properties.targets.protocol import Capabilities, Unsupported


class TinyLoraLinear(nn.Module):
    """y = x W^T + b + sum_a s_a * B_a A_a dropout(x); merge adds s_a * B_a A_a to W."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout = nn.ModuleDict()
        self.merged: list[str] = []

    def add(self, name: str, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float) -> None:
        self.A[name], self.B[name] = nn.Parameter(A.clone()), nn.Parameter(B.clone())
        self.scaling[name] = scaling
        self.dropout[name] = nn.Dropout(p)

    def delta(self, name: str) -> torch.Tensor:
        # Float32 (or better) products, rounded once to the weight's dtype.
        acc = torch.float64 if self.base.weight.dtype == torch.float64 else torch.float32
        return self.scaling[name] * (self.B[name].to(acc) @ self.A[name].to(acc))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for name in self.A:
            if name not in self.merged:
                h = self.dropout[name](x) @ self.A[name].T
                y = y + self.scaling[name] * (h @ self.B[name].T)
        return y

    @torch.no_grad()
    def merge(self, names: Sequence[str], safe: bool) -> None:
        todo = [n for n in names if n not in self.merged]
        w = self.base.weight
        new = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
        for n in todo:
            new = new + self.delta(n)
        new = new.to(w.dtype)
        if safe and not torch.isfinite(new).all():
            raise ValueError(f"merging {todo} would make the weight non-finite")
        w.copy_(new)
        self.merged += todo

    @torch.no_grad()
    def unmerge(self) -> None:
        w = self.base.weight
        acc = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
        for n in reversed(self.merged):
            acc = acc - self.delta(n)
        w.copy_(acc.to(w.dtype))
        self.merged = []


class TinyHandle:
    """The protocol's handle: translates suite calls into the layer's own API."""

    def __init__(self, spec: LayerSpec):
        base = nn.Linear(spec.weight.shape[1], spec.weight.shape[0], bias=spec.base_bias is not None)
        base = base.to(dtype=spec.dtype)
        with torch.no_grad():
            base.weight.copy_(spec.weight)
            if spec.base_bias is not None:
                base.bias.copy_(spec.base_bias)
        self.layer = TinyLoraLinear(base)
        for a in spec.adapters:
            self.layer.add(a.name, a.A, a.B, a.alpha / (math.sqrt(a.r) if a.use_rslora else a.r), a.dropout)
        self.layer.eval()

    def forward(self, x, *, train: bool = False, adapter_names=None):
        if adapter_names is not None:
            raise Unsupported("no mixed-batch forward")
        self.layer.train(train)
        return self.layer(x)

    def merge(self, *, adapter_names=None, safe: bool = False) -> None:
        self.layer.merge(list(adapter_names or self.layer.A.keys()), safe)

    def unmerge(self) -> None:
        self.layer.unmerge()

    def merged_adapters(self) -> list[str]:
        return list(self.layer.merged)

    def weights(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.layer.base.weight.detach()}
        if self.layer.base.bias is not None:
            out["bias"] = self.layer.base.bias.detach()
        return out

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        return {"weight": self.layer.delta(name).to(self.layer.base.weight.dtype)}

    def snapshot(self) -> dict[str, object]:
        state: dict[str, object] = {k: v.clone() for k, v in self.layer.state_dict().items()}
        state["merged"] = list(self.layer.merged)
        return state

    def __getattr__(self, name: str):
        # set_active, set_enabled, set_scale, scale_layer, ... are not implemented here.
        raise Unsupported(f"TinyLoraLinear has no {name}")


class TinyTarget:
    name = "tiny-lora"

    def version(self) -> str:
        return "1.0"

    def capabilities(self) -> Capabilities:
        return Capabilities(
            layers=frozenset({"linear"}),
            dtypes=frozenset({torch.float64, torch.float32, torch.bfloat16, torch.float16}),
            operations=frozenset(
                {"merge", "merge_subset", "safe_merge", "unmerge", "delta_weight", "train_forward"}
            ),
            options=frozenset({"multi_adapter", "rslora", "dropout"}),
            notes={"disable": "not implemented in this example", "mixed_batch": "not implemented"},
        )

    def build(self, spec: LayerSpec) -> TinyHandle:
        return TinyHandle(spec)


TARGET = TinyTarget()
