"""Bad numbers named plainly: NaN, ±Inf, wrong shape, wrong dtype, wrong device.

An error ratio is the right summary for a value that is a little off; for a value of the wrong kind it
hides what went wrong ("error inf exceeds the precision bound (ratio inf)" for a NaN). These checks
run on what a target returned before (form) and after (values) the comparison with the precision
bound, and each names the first offending element and what was expected there. They are pure
functions of the tensors; the caller raises the failure.
"""

from __future__ import annotations

import math

import torch

from properties.precision import Arithmetic, Expected
from properties.spec import LAYER_KINDS


def form_problem(
    actual: object,
    expected: Expected,
    *,
    spec: object,
    arith: Arithmetic,
    quantity: str,
    statistical: bool = False,
) -> str | None:
    """What is wrong with the kind of value a target returned (not a tensor, shape, dtype, device), or None.

    An output, a weight or a delta a layer target returns is in the layer's dtype (``arith.dtype``) and
    on its device (``spec.device``). Not checked: the dtype of a ``statistical`` quantity (the suite's
    own reduction, a float64 mean on the CPU) nor of a layer on a quantized base (``spec.quant``),
    whose decoded weights and block scales have dtypes of their own."""
    if not isinstance(actual, torch.Tensor):
        return f"{quantity}: the target returned {type(actual).__name__}, expected a tensor"
    shape, want = tuple(actual.shape), tuple(expected.exact.shape)
    if shape != want:
        return f"{quantity}: wrong shape {shape}, expected {want}"
    if statistical:
        return None
    layer_dtype = getattr(spec, "kind", None) in LAYER_KINDS and getattr(spec, "quant", None) is None
    if layer_dtype and actual.dtype != arith.dtype:
        got, layer = _name(actual.dtype), _name(arith.dtype)
        return f"{quantity}: wrong dtype {got}, expected {layer} (the layer's dtype)"
    want_device = torch.device(getattr(spec, "device", "cpu"))
    if actual.device.type != want_device.type or (
        want_device.index is not None and actual.device.index != want_device.index
    ):
        return f"{quantity}: wrong device {actual.device}, expected {want_device} (the layer's device)"
    return None


def value_problem(actual: torch.Tensor, expected: Expected, *, quantity: str) -> str | None:
    """NaN or ±Inf where the exact value is a finite number the dtype can hold, or None.

    Named by the first such element (row-major), its exact value and how many elements are affected.
    An infinity is only called wrong where the exact value is at least its bound below the dtype's
    largest finite value, since a correctly rounded result near it may overflow."""
    a = actual.detach().cpu()
    if a.numel() == 0 or not a.is_floating_point() or bool(torch.isfinite(a).all()):
        return None
    exact = expected.exact
    finite_exact = torch.isfinite(exact)
    nan = torch.isnan(a) & finite_exact
    limit = torch.finfo(a.dtype).max
    inf = torch.isinf(a) & finite_exact & (exact.abs() + expected.bound <= limit)
    for bad, what in ((nan, "NaN"), (inf, "infinite")):
        count = int(bad.sum())
        if not count:
            continue
        flat = int(torch.nonzero(bad.flatten())[0])
        index = _index(flat, tuple(a.shape))
        value = float(a.flatten()[flat])
        name = "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
        return (
            f"{quantity}: {name} at index {index} where the exact value is "
            f"{float(exact.flatten()[flat]):.6g} ({count} of {a.numel()} elements {what})"
        )
    return None


def _index(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        out.append(i)
    return tuple(reversed(out))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
