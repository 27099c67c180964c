"""The built-in target: ``lora_core``, the reference LoRA. It is tested like any other library."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

import lora_core
from properties.spec import CONV_KINDS, LAYER_KINDS, LayerSpec
from properties.targets.protocol import OPERATIONS, OPTIONS, Capabilities, LayerHandle


def base_module(spec: LayerSpec, conv1d: Callable[[int, int], nn.Module] | None = None) -> nn.Module:
    """A plain torch module holding the spec's exact base weights (also used by other targets).

    ``conv1d(in_features, out_features)`` builds the GPT-2 Conv1D for ``fan_in_fan_out`` (default
    ``lora_core.Conv1D``; the PEFT target passes transformers' class, the one PEFT recognises). A bias
    the module has but the spec leaves out (Conv1D's, or one of an MHA's two) is zero.
    """
    kw = dict(device=spec.device, dtype=spec.dtype)
    bias = spec.base_bias is not None
    if spec.kind == "linear":
        if spec.fan_in_fan_out:
            m = (conv1d or lora_core.Conv1D)(spec.weight.shape[1], spec.weight.shape[0]).to(**kw)
            params = {"weight": spec.weight.T, "bias": spec.base_bias}
        else:
            m = nn.Linear(spec.weight.shape[1], spec.weight.shape[0], bias=bias, **kw)
            params = {"weight": spec.weight, "bias": spec.base_bias}
    elif spec.kind == "embedding":
        m = nn.Embedding(*spec.weight.shape, padding_idx=spec.padding_idx, **kw)
        params = {"weight": spec.weight}
    elif spec.kind in CONV_KINDS:
        c = spec.conv
        cls = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[spec.kind]
        out_c, in_per_group = spec.weight.shape[:2]
        m = cls(
            in_per_group * c.groups,
            out_c,
            c.kernel_size,
            stride=c.stride,
            padding=c.padding,
            dilation=c.dilation,
            groups=c.groups,
            bias=bias,
            padding_mode=c.padding_mode,
            **kw,
        )
        params = {"weight": spec.weight, "bias": spec.base_bias}
    else:
        E = spec.weight.shape[1]
        bias = bias or spec.out_bias is not None
        m = nn.MultiheadAttention(E, spec.num_heads, bias=bias, batch_first=True, **kw)
        params = {
            "in_proj_weight": spec.weight,
            "in_proj_bias": spec.base_bias,
            "out_proj.weight": spec.out_weight,
            "out_proj.bias": spec.out_bias,
        }
    present = dict(m.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            if value is not None:
                m.get_parameter(name).copy_(value)
            elif name in present:
                present[name].zero_()
    return m


class ReferenceHandle:
    """Drives a ``lora_core`` layer through the protocol."""

    def __init__(self, spec: LayerSpec, exact_unmerge: bool):
        self.spec = spec
        self.layer = lora_core.wrap(
            base_module(spec), fan_in_fan_out=spec.fan_in_fan_out, exact_unmerge=exact_unmerge
        )
        for a in spec.adapters:
            cfg = lora_core.LoraConfig(
                r=a.r,
                lora_alpha=a.alpha,
                lora_dropout=a.dropout,
                use_rslora=a.use_rslora,
                use_dora=a.use_dora,
                lora_bias=a.bias is not None,
                init_lora_weights=False,
            )
            self.layer.add_adapter(a.name, cfg)
            self.layer.load_factors(a.name, **a.tensors())
        self.layer.set_adapter(list(spec.active_adapters))
        self.layer.eval()

    def forward(self, x: torch.Tensor, *, train: bool = False, adapter_names: Sequence[str] | None = None):
        if self.layer.training != train:  # train() walks every submodule: 7% of a reference ci run
            self.layer.train(train)
        kw = {} if adapter_names is None else {"adapter_names": list(adapter_names)}
        if self.spec.kind == "mha":
            return self.layer(x, x, x, need_weights=False, **kw)[0]
        return self.layer(x, **kw)

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        self.layer.merge(
            safe_merge=safe, adapter_names=None if adapter_names is None else list(adapter_names)
        )

    def unmerge(self) -> None:
        self.layer.unmerge()

    def merged_adapters(self) -> list[str]:
        return list(self.layer.merged_adapters)

    def set_active(self, names: Sequence[str]) -> None:
        self.layer.set_adapter(list(names))

    def set_enabled(self, enabled: bool) -> None:
        self.layer.enable_adapters(enabled)

    def set_scale(self, name: str, scale: float) -> None:
        self.layer.set_scale(name, scale)

    def scale_layer(self, factor: float) -> None:
        self.layer.scale_layer(factor)

    def unscale_layer(self, factor: float | None = None) -> None:
        self.layer.unscale_layer(factor)

    def _canonical(self, key: str, t: torch.Tensor) -> torch.Tensor:
        return t.T if self.spec.fan_in_fan_out and key == "weight" else t

    def weights(self) -> dict[str, torch.Tensor]:
        base = self.layer.base_layer
        names = [n for n in self.spec.base_tensors()]
        return {n: self._canonical(n, base.get_parameter(n).detach()) for n in names}

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        return {k: self._canonical(k, v) for k, v in self.layer.get_delta_weights(name).items()}

    def snapshot(self) -> dict[str, object]:
        state: dict[str, object] = {k: v.detach().clone() for k, v in self.layer.state_dict().items()}
        state["merged_adapters"] = list(self.layer.merged_adapters)
        state["active_adapters"] = list(self.layer.active_adapters)
        state["disable_adapters"] = self.layer.disable_adapters
        for key, value in getattr(self.layer, "_caches", {}).items():
            state[f"cache:{key}"] = value.detach().clone() if isinstance(value, torch.Tensor) else value
        return state

    def merge_and_unload(self) -> nn.Module:
        return self.layer.merge_and_unload()


class ReferenceTarget:
    """``lora_core`` with subtractive unmerge (the default), or with ``exact_unmerge=True``."""

    def __init__(self, exact_unmerge: bool = False):
        self.exact_unmerge = exact_unmerge
        self.name = "reference-exact" if exact_unmerge else "reference"

    def version(self) -> str:
        return getattr(lora_core, "__version__", "0")

    def capabilities(self) -> Capabilities:
        ops = OPERATIONS if self.exact_unmerge else OPERATIONS - {"exact_unmerge"}
        return Capabilities(
            layers=frozenset(LAYER_KINDS),
            dtypes=frozenset({torch.float64, torch.float32, torch.bfloat16, torch.float16}),
            operations=frozenset(ops),
            options=OPTIONS,
        )

    def build(self, spec: LayerSpec) -> LayerHandle:
        return ReferenceHandle(spec, self.exact_unmerge)


TARGET = ReferenceTarget()
EXACT = ReferenceTarget(exact_unmerge=True)
