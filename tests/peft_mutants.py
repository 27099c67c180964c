"""Deliberately broken variants of real PEFT, one bug each, to prove the catalogue bites on PEFT itself.

A mutant builds the ordinary :class:`~properties.targets.peft_target.PeftHandle` and then patches *that
handle's own PEFT layer instance* (an instance attribute shadows the class method; a dropout module gets
its own ``forward``). PEFT's classes are never touched, so nothing leaks into other handles, other targets
or other tests; :func:`peft_class_state` lets a test check exactly that.

Mutants and their clean control run with DoRA and multiple adapters turned off (:data:`DROPPED_OPTIONS`):
PEFT itself fails some cells with those (``findings/peft.md``), and a kill only counts where the clean
release passes the very same cell.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from properties.runner import Cell
from properties.spec import LayerSpec
from properties.targets.peft_target import PeftHandle, PeftTarget

DROPPED_OPTIONS = frozenset({"dora", "multi_adapter"})

Mutate = Callable[[PeftHandle], None]


@dataclass(frozen=True)
class PeftMutant:
    """One bug in PEFT: the property expected to catch it, the cell to run, and how to inject it."""

    name: str
    property: str
    layer: str
    dtype: str
    description: str
    mutate: Mutate
    max_examples: int | None = None

    @property
    def cell(self) -> Cell:
        return Cell(self.property, self.layer, self.dtype)


class PeftMutantTarget(PeftTarget):
    """The PEFT target without :data:`DROPPED_OPTIONS`; with a mutant, every handle carries its bug."""

    def __init__(self, mutant: PeftMutant | None = None) -> None:
        self.mutant = mutant
        self.name = f"peft-mutant-{mutant.name}" if mutant else "peft-clean"

    def capabilities(self):  # noqa: ANN201 - same type as the base class
        caps = super().capabilities()
        return replace(caps, options=caps.options - DROPPED_OPTIONS)

    def build(self, spec: LayerSpec) -> PeftHandle:
        handle = super().build(spec)
        if self.mutant is not None:
            self.mutant.mutate(handle)
        return handle


MUTANTS: dict[str, PeftMutant] = {}


def mutant(
    name: str, prop: str, layer: str, dtype: str, description: str, *, max_examples: int | None = None
) -> Callable[[Mutate], Mutate]:
    """Register ``fn`` (which patches one freshly built handle) as a PEFT mutant."""

    def deco(fn: Mutate) -> Mutate:
        assert name not in MUTANTS, name
        MUTANTS[name] = PeftMutant(name, prop, layer, dtype, description, fn, max_examples)
        return fn

    return deco


def _patch(obj: Any, method: str, fn: Callable[..., Any]) -> None:
    """Shadow ``obj.method`` on this instance only; ``fn`` gets the instance and the original bound method."""
    original = getattr(obj, method)
    setattr(obj, method, types.MethodType(lambda self, *a, **kw: fn(self, original, *a, **kw), obj))


def peft_class_state() -> dict[str, dict[str, object]]:
    """Every attribute of PEFT's LoRA layer classes: a mutant must leave these exactly as they were."""
    from peft.tuners import lora

    classes = [lora.LoraLayer, lora.Linear, lora.Embedding, lora.Conv2d]
    return {c.__name__: dict(vars(c)) for c in classes}


# ----------------------------------------------------------------------------- mutants


@mutant("delta_scaling_wrong", "reference_delta", "linear", "float32", "get_delta_weight uses 1.5 x scaling")
def _delta_scaling_wrong(h: PeftHandle) -> None:
    _patch(h.layer, "get_delta_weight", lambda self, orig, name: orig(name) * 1.5)


@mutant(
    "fan_in_fan_out_no_transpose",
    "merge_equivalence",
    "linear",
    "float32",
    "get_delta_weight reshapes B @ A to the stored (in, out) layout instead of transposing it",
)
def _fan_in_fan_out_no_transpose(h: PeftHandle) -> None:
    def delta(self: nn.Module, orig: Callable[[str], torch.Tensor], name: str) -> torch.Tensor:
        d = orig(name)
        return d.T.reshape(d.shape) if self.fan_in_fan_out else d

    _patch(h.layer, "get_delta_weight", delta)


@mutant(
    "safe_merge_writes_first",
    "safe_merge_atomic",
    "linear",
    "float32",
    "safe merge adds the delta in place, then checks finiteness and raises without restoring",
)
def _safe_merge_writes_first(h: PeftHandle) -> None:
    def merge(
        self: nn.Module, orig: Callable[..., None], safe_merge: bool = False, adapter_names=None
    ) -> None:
        orig(safe_merge=False, adapter_names=adapter_names)
        if safe_merge and not torch.isfinite(self.get_base_layer().weight).all():
            raise ValueError("NaNs detected in the merged weights")

    _patch(h.layer, "merge", merge)


def _dropouts(h: PeftHandle) -> list[nn.Module]:
    return [d for m in h._lora_layers() for d in m.lora_dropout.values() if isinstance(d, nn.Dropout)]


@mutant(
    "dropout_in_eval",
    "eval_dropout_identity",
    "linear",
    "float32",
    "lora_dropout stays active in eval mode",
)
def _dropout_in_eval(h: PeftHandle) -> None:
    for d in _dropouts(h):
        d.forward = types.MethodType(lambda self, x: F.dropout(x, self.p, training=True), d)


@mutant(
    "dropout_not_inverted",
    "train_dropout_unbiased",
    "linear",
    "float32",
    "train-mode dropout zeroes entries but does not rescale the kept ones by 1 / (1 - p)",
    max_examples=20,
)
def _dropout_not_inverted(h: PeftHandle) -> None:
    for d in _dropouts(h):
        d.forward = types.MethodType(
            lambda self, x: (
                F.dropout(x, self.p, training=self.training) * (1 - self.p if self.training else 1)
            ),
            d,
        )


@mutant(
    "merge_not_recorded",
    "merge_idempotent",
    "linear",
    "float32",
    "merge adds the delta but does not record the adapter in merged_adapters",
)
def _merge_not_recorded(h: PeftHandle) -> None:
    def merge(self: nn.Module, orig: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        orig(*args, **kwargs)
        self.merged_adapters.clear()

    _patch(h.layer, "merge", merge)


@mutant("unmerge_does_nothing", "merge_roundtrip", "linear", "float32", "unmerge() is a no-op")
def _unmerge_does_nothing(h: PeftHandle) -> None:
    _patch(h.layer, "unmerge", lambda self, orig: None)


@mutant(
    "set_scale_ignores_rslora",
    "set_scale_identity",
    "linear",
    "float32",
    "set_scale(name, c) sets c * alpha / r even for rsLoRA adapters (alpha / sqrt(r) expected)",
)
def _set_scale_ignores_rslora(h: PeftHandle) -> None:
    def set_scale(self: nn.Module, orig: Callable[..., None], name: str, scale: float) -> None:
        self.scaling[name] = scale * self.lora_alpha[name] / self.r[name]

    for m in h._lora_layers():
        _patch(m, "set_scale", set_scale)


@mutant("scale_layer_ignored", "scaling_law", "linear", "float32", "scale_layer(f) changes nothing")
def _scale_layer_ignored(h: PeftHandle) -> None:
    for m in h._lora_layers():
        _patch(m, "scale_layer", lambda self, orig, f: None)


@mutant(
    "mixed_batch_wrong_adapter",
    "mixed_batch",
    "linear",
    "float32",
    "mixed-batch forward gives each row the next adapter (cyclically) instead of its own",
)
def _mixed_batch_wrong_adapter(h: PeftHandle) -> None:
    def forward(
        self: nn.Module, orig: Callable[..., torch.Tensor], x, *args: Any, adapter_names: Sequence[str], **kw
    ):
        names = list(self.lora_A.keys())
        shifted = [n if n not in names else names[(names.index(n) + 1) % len(names)] for n in adapter_names]
        return orig(x, *args, adapter_names=shifted, **kw)

    _patch(h.layer, "_mixed_batch_forward", forward)


@mutant("disable_ignored", "disable_exact", "linear", "float32", "enable_adapters(False) changes nothing")
def _disable_ignored(h: PeftHandle) -> None:
    for m in h._lora_layers():
        _patch(m, "enable_adapters", lambda self, orig, enabled: None)
