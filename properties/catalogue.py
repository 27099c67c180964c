"""The property catalogue: each property is a claim about LoRA, with an id and a one-line statement.

A property gets a :class:`Context` per example — the target, the drawn example, the arithmetic of its
dtype — and talks to the implementation only through the target protocol. It records every numeric
comparison as a :class:`~properties.results.Sample` and raises :class:`PropertyFailure` when a claim
does not hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from properties.bias import Z_THRESHOLD, BiasTally
from properties.diagnostics import form_problem, value_problem
from properties.precision import Arithmetic, Expected, inner_dim, measure
from properties.results import Sample
from properties.spec import LAYER_KINDS, Example, LayerKind, LayerSpec
from properties.strategies import Draw, Hostile
from properties.targets.protocol import Capabilities, LayerHandle, Target, Unsupported


class PropertyFailure(AssertionError):
    """A LoRA claim does not hold for this example."""


class OutOfRange(Exception):
    """The example lies outside the claim: a value a correct implementation stores may exceed the
    dtype's range (decided from the exact values, see ``precision.range_violation``). The runner sets
    the example aside and counts it under this reason."""


@dataclass
class Context:
    """Everything a property needs for one example."""

    target: Target
    example: Example
    arith: Arithmetic
    data: st.DataObject | None = None
    hostile: Hostile | None = None
    clean_spec: LayerSpec | None = None  # hostile properties: the spec before the entry was planted
    samples: list[Sample] = field(default_factory=list)
    bias: list[BiasTally] = field(default_factory=list)

    @property
    def spec(self):
        return self.example.spec

    @property
    def x(self) -> torch.Tensor:
        return self.example.x

    def build(self, spec=None) -> LayerHandle:
        return self.target.build(spec or self.spec)

    def draw(self, strategy: st.SearchStrategy, label: str | None = None):
        assert self.data is not None, "property drew without a data object"
        return self.data.draw(strategy, label=label)

    def check(
        self,
        actual: torch.Tensor,
        expected: Expected,
        quantity: str,
        *,
        rank: int | None = None,
        cycles: int | None = None,
        statistical: bool = False,
        layer: LayerSpec | None = None,
    ) -> Sample:
        """Compare against the precision model's bound; record the sample; fail when ratio > 1.

        ``statistical``: the bound is a confidence radius, not rounding, so the error in units of
        ``u M`` means nothing and is left out (NaN) of the rounding statistics. ``layer``: the layer
        compared, when it is not the example's spec (the model half checks one module at a time)."""
        if expected.out_of_range:
            raise OutOfRange(expected.out_of_range)
        spec = layer or self.spec
        r = rank if rank is not None else sum(a.r for a in spec.adapters)
        wrong = form_problem(
            actual, expected, spec=spec, arith=self.arith, quantity=quantity, statistical=statistical
        )
        if wrong:
            raise PropertyFailure(wrong)
        sample = measure(
            actual, expected, self.arith, quantity=quantity, inner=inner_dim(spec), rank=r, cycles=cycles
        )
        if statistical:
            sample.err_u = math.nan
        self.samples.append(sample)
        if not sample.ratio <= 1.0:
            raise PropertyFailure(
                value_problem(actual, expected, quantity=quantity)
                or f"{quantity}: error {sample.error:.3g} exceeds the precision bound {sample.bound:.3g} "
                f"(ratio {sample.ratio:.3g}; exact value {sample.reference:.6g}; "
                f"error = {sample.err_u:.3g} u*M)"
            )
        return sample

    def check_bias(self, tally: BiasTally | None) -> None:
        """Record one comparison's bias test (``properties.bias``); fail when its errors lean one way
        along the LoRA delta against every correct rounding sequence (false-alarm rate <= 1e-6)."""
        if tally is None:
            return
        self.bias.append(tally)
        name, z, eps = tally.verdict()
        if abs(z) > Z_THRESHOLD:
            raise PropertyFailure(
                f"{tally.quantity}: systematic error along the LoRA delta, below the element-wise bound: "
                f"relative scaling error ~ {eps:.3g}, z = {z:.3g} beyond {Z_THRESHOLD:.3g} against every "
                f"correct rounding sequence (closest: {name}); false-alarm rate <= 1e-6"
            )

    def check_weights(self, actual: dict[str, torch.Tensor], expected: dict[str, Expected], what: str, **kw):
        missing = set(expected) - set(actual)
        if missing:
            raise PropertyFailure(f"{what}: target did not report {sorted(missing)}")
        for key, exp in expected.items():
            self.check(actual[key], exp, f"{what}[{key}]", **kw)


def bits(t: torch.Tensor) -> torch.Tensor:
    """A view that compares bit patterns (NaN payloads and signed zeros included)."""
    if t.is_floating_point():
        return (
            t.detach()
            .cpu()
            .contiguous()
            .view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
        )
    return t.detach().cpu()


def assert_identical(before: dict[str, object], after: dict[str, object], what: str) -> None:
    """Bit-identical state: tensors by bit pattern and dtype, everything else by ``==``."""
    if set(before) != set(after):
        raise PropertyFailure(f"{what}: state keys changed: {sorted(set(before) ^ set(after))}")
    for k, b in before.items():
        a = after[k]
        if isinstance(b, torch.Tensor):
            same = isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
            if not (same and torch.equal(bits(a), bits(b))):
                raise PropertyFailure(f"{what}: {k} changed")
        elif a != b:
            raise PropertyFailure(f"{what}: {k} changed from {b!r} to {a!r}")


DrawFn = Callable[[Capabilities, LayerKind, torch.dtype], Draw]


def default_draw(caps: Capabilities, kind: LayerKind, dtype: torch.dtype) -> Draw:
    return Draw(kind=kind, dtype=dtype, options=caps.options)


@dataclass(frozen=True)
class Property:
    id: str
    statement: str
    check: Callable[[Context], None]
    requires: frozenset[str] = frozenset()
    draw: DrawFn = default_draw
    layers: tuple[LayerKind, ...] = LAYER_KINDS
    hostile: bool = False
    needs_data: bool = False
    cost: float = 1.0  # relative cost of one example; a profile gives costly properties fewer
    # The model half (``properties.models``): its own example strategy, built from the Draw, and the
    # target it talks to (a layer target's model half). ``None``: the layer half's.
    examples: Callable[[object], st.SearchStrategy] | None = None
    bind: Callable[[Target], Target] | None = None

    def missing(self, caps: Capabilities) -> list[str]:
        # an option may be required too (several adapters summed: ``multi_adapter``)
        return sorted(self.requires - caps.operations - caps.options)


REGISTRY: dict[str, Property] = {}


def prop(
    id: str,
    statement: str,
    *,
    requires: Iterable[str] = (),
    draw: DrawFn = default_draw,
    layers: tuple[LayerKind, ...] = LAYER_KINDS,
    hostile: bool = False,
    needs_data: bool = False,
    cost: float = 1.0,
    examples: Callable[[object], st.SearchStrategy] | None = None,
    bind: Callable[[Target], Target] | None = None,
):
    """Register a property check under ``id``."""

    def deco(fn: Callable[[Context], None]) -> Callable[[Context], None]:
        if id in REGISTRY:
            raise ValueError(f"duplicate property id {id!r}")
        REGISTRY[id] = Property(
            id, statement, fn, frozenset(requires), draw, layers, hostile, needs_data, cost, examples, bind
        )
        return fn

    return deco


def all_properties() -> dict[str, Property]:
    """The catalogue, in a stable order (importing the modules registers them)."""
    # Import order is catalogue order: numbers first, then state changes, switches, dropout.
    from properties.checks import equivalence, state, scaling, dropout  # noqa: F401, I001
    from properties.models import checks  # noqa: F401  (the model half: property x architecture x dtype)
    from properties.quantized.checks import extend_registry

    extend_registry()  # the same properties on quantized bases (properties/quantized)
    return REGISTRY


__all__ = [
    "Context",
    "OutOfRange",
    "Property",
    "PropertyFailure",
    "Unsupported",
    "all_properties",
    "assert_identical",
    "prop",
]
