"""Deliberately broken variants of the reference target: one bug each, to prove the catalogue bites.

A mutant builds the ordinary :class:`~properties.targets.reference.ReferenceHandle` and then patches
*that one handle or its layer instance* (instance attributes shadow the class methods), so ``lora_core``
itself is never touched and every other target, the clean reference included, stays correct.

Each mutant names the property ids expected to catch it; the first one, with ``layer`` and ``dtype``,
is the cell ``tests/test_mutants.py`` runs. ``TOLERATED`` holds variants that differ from the
reference but are legitimate implementations within the precision model: the suite must pass them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lora_core import compute_dtype
from lora_core.layer import LoraLayer
from properties.runner import Cell
from properties.spec import LayerSpec
from properties.targets.protocol import LayerHandle
from properties.targets.reference import ReferenceHandle, ReferenceTarget

Mutate = Callable[[ReferenceHandle], None]


@dataclass(frozen=True)
class Mutant:
    """One bug: which properties must catch it, the cell to run, and how to inject it."""

    name: str
    catches: tuple[str, ...]
    layer: str
    dtype: str
    description: str
    mutate: Mutate
    exact_unmerge: bool = False
    max_examples: int | None = None

    @property
    def cell(self) -> Cell:
        return Cell(self.catches[0], self.layer, self.dtype)

    def target(self) -> MutantTarget:
        return MutantTarget(self)


class MutantTarget(ReferenceTarget):
    """The reference target, except every handle it builds carries the mutant's bug."""

    def __init__(self, mutant: Mutant):
        super().__init__(exact_unmerge=mutant.exact_unmerge)
        self.mutant = mutant
        self.name = f"mutant-{mutant.name}"

    def build(self, spec: LayerSpec) -> LayerHandle:
        handle = ReferenceHandle(spec, self.exact_unmerge)
        self.mutant.mutate(handle)
        return handle


MUTANTS: dict[str, Mutant] = {}
CATCH_LOG: list[tuple[str, Cell, str, int, float]] = []
"""(mutant, cell, status, examples, seconds) per mutant run, printed by ``conftest.py``."""
TOLERATED: dict[str, Mutant] = {}


def mutant(
    name: str,
    catches: Sequence[str],
    layer: str,
    dtype: str,
    description: str,
    *,
    exact_unmerge: bool = False,
    max_examples: int | None = None,
    tolerated: bool = False,
) -> Callable[[Mutate], Mutate]:
    """Register ``fn`` (which patches one freshly built handle) as a mutant."""

    def deco(fn: Mutate) -> Mutate:
        table = TOLERATED if tolerated else MUTANTS
        assert name not in table, name
        table[name] = Mutant(name, tuple(catches), layer, dtype, description, fn, exact_unmerge, max_examples)
        return fn

    return deco


# ----------------------------------------------------------------------------- helpers


def _recompute_scaling(layer: LoraLayer, default: Callable[[str], float]) -> None:
    """Install a (wrong) default scaling rule and apply it to the adapters already loaded."""
    layer._default_scaling = default
    for n in layer.scaling:
        layer.scaling[n] = default(n)


def _write_unmerged(layer: LoraLayer, name: str) -> None:
    """Subtract the plain LoRA delta of ``name`` (what an unmerge does for a non-DoRA adapter)."""
    cur = layer._current()
    fp = {k: v.to(compute_dtype(v.dtype)) for k, v in cur.items()}
    deltas = layer._lora_deltas(name, next(iter(fp.values())).dtype)
    layer._write({k: (fp[k] - d).to(cur[k].dtype) for k, d in deltas.items()})


class _UninvertedDropout(nn.Module):
    """Dropout that zeroes with probability p but forgets to rescale the kept entries by 1/(1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * (torch.rand_like(x) >= self.p).to(x.dtype)


# ----------------------------------------------------------------------------- scaling


@mutant(
    "scaling_inverted",
    ["reference_forward", "merge_equivalence"],
    "linear",
    "float32",
    "scaling is r / alpha instead of alpha / r",
)
def _scaling_inverted(h: ReferenceHandle) -> None:
    L = h.layer
    _recompute_scaling(L, lambda n: (math.sqrt(L.r[n]) if L.use_rslora[n] else L.r[n]) / L.lora_alpha[n])


@mutant(
    "rslora_ignored",
    ["reference_forward", "reference_delta"],
    "linear",
    "float32",
    "use_rslora is ignored: scaling is alpha / r instead of alpha / sqrt(r)",
)
def _rslora_ignored(h: ReferenceHandle) -> None:
    L = h.layer
    _recompute_scaling(L, lambda n: L.lora_alpha[n] / L.r[n])


@mutant(
    "set_scale_resets_to_alpha",
    ["set_scale_identity", "scaling_law"],
    "linear",
    "float32",
    "set_scale(name, c) sets the scaling to c * alpha, forgetting the / r",
)
def _set_scale_alpha(h: ReferenceHandle) -> None:
    L = h.layer
    L.set_scale = lambda name, scale: L.scaling.__setitem__(name, scale * L.lora_alpha[name])


@mutant(
    "unscale_reset_ignores_rslora",
    ["scaling_law"],
    "linear",
    "float32",
    "unscale_layer() resets every active scaling to alpha / r, ignoring rsLoRA",
)
def _unscale_reset(h: ReferenceHandle) -> None:
    L = h.layer
    orig = L.unscale_layer

    def unscale_layer(factor: float | None = None) -> None:
        if factor is not None:
            return orig(factor)
        for n in L._active:
            L.scaling[n] = L.lora_alpha[n] / L.r[n]

    L.unscale_layer = unscale_layer


@mutant(
    "scale_layer_first_only",
    ["scaling_law"],
    "linear",
    "float32",
    "scale_layer(f) multiplies only the first active adapter's scaling",
)
def _scale_layer_first(h: ReferenceHandle) -> None:
    L = h.layer

    def scale_layer(factor: float) -> None:
        L.scaling[L._active[0]] *= factor

    L.scale_layer = scale_layer


# ----------------------------------------------------------------------------- deltas


@mutant(
    "delta_scaled_1001",
    ["reference_delta", "merge_equivalence"],
    "linear",
    "float32",
    "the merge delta is 1.001 * s B A (a 1e-3 relative error, invisible to atol-style tests)",
)
def _delta_1001(h: ReferenceHandle) -> None:
    orig = h.layer._weight_delta
    h.layer._weight_delta = lambda name, dtype: orig(name, dtype) * 1.001


@mutant(
    "fan_in_fan_out_reshaped",
    ["merge_equivalence", "reference_delta"],
    "linear",
    "float32",
    "fan_in_fan_out: the (out, in) delta is reshaped to (in, out) instead of transposed",
)
def _fifo_reshape(h: ReferenceHandle) -> None:
    L = h.layer
    orig = L._weight_delta

    def weight_delta(name: str, dtype: torch.dtype) -> torch.Tensor:
        d = orig(name, dtype)
        return d.T.contiguous().reshape(d.shape) if L.fan_in_fan_out else d

    L._weight_delta = weight_delta


@mutant(
    "conv_groups_ignored",
    ["reference_delta", "merge_equivalence"],
    "conv2d",
    "float32",
    "grouped conv delta pairs every group's B with group 0's rows of A",
)
def _conv_groups(h: ReferenceHandle) -> None:
    L = h.layer

    def weight_delta(name: str, dtype: torch.dtype) -> torch.Tensor:
        g = L.base_layer.groups
        a, b = L.lora_A[name].to(dtype), L.lora_B[name].to(dtype)
        rg = a.shape[0] // g
        a0 = a[:rg].reshape(1, rg, -1).expand(g, rg, -1)
        grouped = torch.bmm(b.reshape(g, b.shape[0] // g, -1), a0)
        return grouped.reshape(b.shape[0], *a.shape[1:]) * L.scaling[name]

    L._weight_delta = weight_delta


@mutant(
    "conv_branch_zero_pads",
    ["layer_options_honoured"],
    "conv2d",
    "float32",
    "the LoRA A conv zero-pads whatever the base's padding_mode (reflect, replicate, circular)",
)
def _conv_zero_pads(h: ReferenceHandle) -> None:
    L = h.layer

    def branch(name: str, x: torch.Tensor) -> torch.Tensor:
        base = L.base_layer
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[L.ndim]
        hidden = conv(x, L.lora_A[name], None, base.stride, base.padding, base.dilation, base.groups)
        return conv(hidden, L.lora_B[name], groups=base.groups)

    L._branch = branch


@mutant(
    "embedding_delta_reshaped",
    ["reference_delta", "merge_equivalence"],
    "embedding",
    "float32",
    "embedding delta (B A) of shape (dim, num) is reshaped to (num, dim) instead of transposed",
)
def _embedding_reshape(h: ReferenceHandle) -> None:
    L = h.layer

    def weight_delta(name: str, dtype: torch.dtype) -> torch.Tensor:
        ba = L.lora_B[name].to(dtype) @ L.lora_A[name].to(dtype)
        return ba.reshape(ba.shape[1], ba.shape[0]) * L.scaling[name]

    L._weight_delta = weight_delta


@mutant(
    "mha_out_proj_not_merged",
    ["merge_equivalence", "reference_delta"],
    "mha",
    "float32",
    "MHA merge folds the in_proj LoRA but forgets the out_proj LoRA",
)
def _mha_out_proj(h: ReferenceHandle) -> None:
    orig = h.layer._lora_deltas
    h.layer._lora_deltas = lambda name, dtype: {
        k: v for k, v in orig(name, dtype).items() if k != "out_proj.weight"
    }


@mutant(
    "lora_bias_not_merged",
    ["merge_equivalence", "reference_delta"],
    "linear",
    "float32",
    "merge folds s B A into the weight but forgets s * lora_bias in the bias",
)
def _bias_not_merged(h: ReferenceHandle) -> None:
    orig = h.layer._lora_deltas
    h.layer._lora_deltas = lambda name, dtype: {k: v for k, v in orig(name, dtype).items() if k != "bias"}


@mutant(
    "dora_norm_frobenius",
    ["reference_forward", "merge_equivalence"],
    "linear",
    "float32",
    "DoRA's forward norm is taken over the whole matrix instead of per output feature",
)
def _dora_norm(h: ReferenceHandle) -> None:
    L = h.layer
    L._weight_norm = lambda name, w: L._out_major(w + L._weight_delta(name, w.dtype)).flatten().norm()


@mutant(
    "dora_bias_cancellation",
    ["reference_forward", "merge_roundtrip"],
    "linear",
    "float16",
    "the unmerged DoRA forward recovers W x as round(W x + b) - b (PEFT >= 0.14): the bias cancels W x's "
    "low bits and the DoRA factor f - 1 multiplies the error",
    max_examples=400,
)
def _dora_bias_cancellation(h: ReferenceHandle) -> None:
    L = h.layer
    base = L.base_layer
    if getattr(base, "bias", None) is None:
        return

    def apply_weight(x: torch.Tensor) -> torch.Tensor:
        out = base(x.to(base.weight.dtype)).to(x.dtype)
        return out - L._broadcast(base.bias.to(x.dtype), out)

    L._apply_weight = apply_weight


# ----------------------------------------------------------------------------- merge / unmerge state


@mutant(
    "merge_not_marked",
    ["merge_idempotent"],
    "linear",
    "float32",
    "merge does not record the adapter as merged, so merging twice adds the delta twice",
)
def _merge_not_marked(h: ReferenceHandle) -> None:
    L = h.layer
    orig = L.merge

    def merge(safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        before = list(L.merged_adapters)
        orig(safe_merge=safe_merge, adapter_names=adapter_names)
        L.merged_adapters = before

    L.merge = merge


@mutant(
    "unmerge_forgets_first",
    ["merge_roundtrip", "merge_cycle_drift"],
    "linear",
    "float32",
    "unmerge subtracts every merged adapter but the first one merged",
)
def _unmerge_forgets(h: ReferenceHandle) -> None:
    L = h.layer

    @torch.no_grad()
    def unmerge() -> None:
        for name in reversed(L.merged_adapters[1:]):
            _write_unmerged(L, name)
        L.merged_adapters = []

    L.unmerge = unmerge


@mutant(
    "unmerge_when_unmerged_subtracts",
    ["unmerge_noop"],
    "linear",
    "float32",
    "unmerge() with nothing merged subtracts the active adapters' deltas anyway",
)
def _unmerge_unmerged(h: ReferenceHandle) -> None:
    L = h.layer
    orig = L.unmerge

    @torch.no_grad()
    def unmerge() -> None:
        if L.merged:
            return orig()
        for name in reversed(L._active):
            _write_unmerged(L, name)

    L.unmerge = unmerge


@mutant(
    "unmerge_only_first_cycle",
    ["merge_cycle_drift"],
    "linear",
    "float32",
    "a 'restored' flag is never reset: from the second cycle on, unmerge only clears merged_adapters",
)
def _unmerge_once(h: ReferenceHandle) -> None:
    L = h.layer
    orig = L.unmerge
    calls = [0]

    def unmerge() -> None:
        if not L.merged:
            return orig()
        calls[0] += 1
        if calls[0] == 1:
            return orig()
        L.merged_adapters = []

    L.unmerge = unmerge


@mutant(
    "exact_unmerge_subtracts",
    ["merge_roundtrip"],
    "linear",
    "bfloat16",
    "claims exact_unmerge but unmerges by subtraction, which is not bit-exact in bfloat16",
    exact_unmerge=True,
)
def _exact_subtracts(h: ReferenceHandle) -> None:
    L = h.layer
    orig = L.unmerge

    def unmerge() -> None:
        L._originals = None
        orig()

    L.unmerge = unmerge


@mutant(
    "merge_from_original",
    ["merge_order"],
    "linear",
    "float32",
    "each merge starts from the weights saved at load time, so one-at-a-time merges keep only the last",
)
def _merge_from_original(h: ReferenceHandle) -> None:
    L = h.layer
    originals = {k: v.clone() for k, v in L._current().items()}
    orig = L.merge

    @torch.no_grad()
    def merge(safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        if L.merged_adapters:
            L._write(originals)
        orig(safe_merge=safe_merge, adapter_names=adapter_names)

    L.merge = merge


@mutant(
    "merge_subset_merges_all",
    ["merge_subset", "merge_order"],
    "linear",
    "float32",
    "merge(adapter_names=S) ignores S and merges every active adapter",
)
def _subset_all(h: ReferenceHandle) -> None:
    def merge(*, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        ReferenceHandle.merge(h, safe=safe)

    h.merge = merge


@mutant(
    "merge_keeps_float32",
    ["dtype_device_preserved"],
    "linear",
    "bfloat16",
    "merge stores the float32 merged weights without casting back to the base dtype",
)
def _merge_float32(h: ReferenceHandle) -> None:
    L = h.layer

    def write(values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            L._param(key).data = value.detach().to(torch.float32).clone()

    L._write = write


@mutant(
    "merge_and_unload_returns_wrapper",
    ["merge_and_unload"],
    "linear",
    "float32",
    "merge_and_unload merges but returns the LoRA wrapper instead of the base module",
)
def _unload_wrapper(h: ReferenceHandle) -> None:
    def merge_and_unload() -> nn.Module:
        h.layer.merge()
        return h.layer

    h.merge_and_unload = merge_and_unload


@mutant(
    "merge_and_unload_skips_merge",
    ["merge_and_unload"],
    "linear",
    "float32",
    "merge_and_unload returns the base module without merging first",
)
def _unload_no_merge(h: ReferenceHandle) -> None:
    h.merge_and_unload = lambda: h.layer.base_layer


# ----------------------------------------------------------------------------- safe merge


@mutant(
    "safe_merge_writes_first",
    ["safe_merge_atomic"],
    "linear",
    "float32",
    "safe merge writes the merged weights, then checks them and raises, leaving them written",
)
def _safe_writes_first(h: ReferenceHandle) -> None:
    def merge(*, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        ReferenceHandle.merge(h, adapter_names=adapter_names, safe=False)
        if safe and not all(torch.isfinite(v).all() for v in h.weights().values()):
            raise ValueError("merged weights are not finite")

    h.merge = merge


@mutant(
    "safe_merge_never_checks",
    ["safe_merge_atomic"],
    "linear",
    "float32",
    "merge(safe=True) is the unsafe merge: NaN/Inf/overflow are written silently",
)
def _safe_never(h: ReferenceHandle) -> None:
    h.merge = lambda *, adapter_names=None, safe=False: ReferenceHandle.merge(h, adapter_names=adapter_names)


@mutant(
    "safe_merge_always_raises",
    ["safe_merge_atomic"],
    "linear",
    "float32",
    "merge(safe=True) raises ValueError even when every merged value is finite",
)
def _safe_always(h: ReferenceHandle) -> None:
    def merge(*, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        if safe:
            raise ValueError("refusing to merge")
        ReferenceHandle.merge(h, adapter_names=adapter_names)

    h.merge = merge


# ----------------------------------------------------------------------------- dropout / switches


@mutant(
    "dropout_in_eval",
    ["eval_dropout_identity"],
    "linear",
    "float32",
    "the LoRA dropout modules stay in train mode when the layer is put in eval",
)
def _dropout_eval(h: ReferenceHandle) -> None:
    L = h.layer

    def train(mode: bool = True) -> nn.Module:
        nn.Module.train(L, mode)
        L.lora_dropout.train(True)
        return L

    L.train = train
    L.eval()


@mutant(
    "dropout_not_inverted",
    ["train_dropout_unbiased"],
    "linear",
    "float32",
    "train-mode dropout zeroes entries but does not scale the rest by 1 / (1 - p)",
)
def _dropout_uninverted(h: ReferenceHandle) -> None:
    L = h.layer
    for name, module in list(L.lora_dropout.items()):
        if isinstance(module, nn.Dropout):
            L.lora_dropout[name] = _UninvertedDropout(module.p)
    L.eval()


@mutant(
    "dropout_on_base_path",
    ["train_dropout_unbiased"],
    "linear",
    "float32",
    "train-mode dropout is applied to the base layer's input as well as LoRA's",
)
def _dropout_base(h: ReferenceHandle) -> None:
    L = h.layer
    orig = L.forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not L.training or L.disable_adapters:
            return orig(x, *args, **kwargs)
        drop = next(iter(L.lora_dropout.values()))
        out = L.base_layer(drop(x), *args, **kwargs)
        for name in L._pending():
            out = out + L._lora_output(name, x).to(out.dtype)
        return out

    L.forward = forward


@mutant(
    "disable_ignored",
    ["disable_exact"],
    "linear",
    "float32",
    "set_enabled(False) does nothing: a disabled layer still adds LoRA",
)
def _disable_ignored(h: ReferenceHandle) -> None:
    h.set_enabled = lambda enabled: None


@mutant(
    "mixed_batch_rows_shifted",
    ["mixed_batch"],
    "linear",
    "float32",
    "mixed batch: row i uses the adapter named for row i + 1 (an off-by-one)",
)
def _mixed_shift(h: ReferenceHandle) -> None:
    def forward(x: torch.Tensor, *, train: bool = False, adapter_names: Sequence[str] | None = None):
        if adapter_names is not None:
            names = list(adapter_names)
            adapter_names = names[1:] + names[:1]
        return ReferenceHandle.forward(h, x, train=train, adapter_names=adapter_names)

    h.forward = forward


# ----------------------------------------------------------------------------- tolerated


@mutant(
    "half_precision_delta",
    ["merge_equivalence", "merge_roundtrip", "reference_delta"],
    "linear",
    "bfloat16",
    "the delta is formed in the base dtype (B A rounded, then * s rounded), as PEFT "
    "does on GPU, before the rounded add",
    tolerated=True,
)
def _half_delta(h: ReferenceHandle) -> None:
    L = h.layer
    orig = L._weight_delta
    L._weight_delta = lambda name, dtype: orig(name, L.base_weight.dtype).to(dtype)


# ----------------------------------------------------------------------------- below the rounding


@mutant(
    "scaling_in_storage_dtype",
    ["reference_delta", "merge_equivalence"],
    "linear",
    "bfloat16",
    "alpha / r is kept in the storage dtype (off by up to 2^-9 relative in bfloat16): every delta "
    "element leans the same way by less than an ulp, which only the bias statistic sees",
)
def _scaling_in_storage_dtype(h: ReferenceHandle) -> None:
    L = h.layer
    dtype = L.base_weight.dtype
    default = L._default_scaling
    _recompute_scaling(L, lambda n: float(torch.tensor(default(n), dtype=dtype)))
