"""Dropout acts on the LoRA input only: identity in eval, unbiased (inverted) in train."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from properties import oracle
from properties.catalogue import Context, PropertyFailure, assert_identical, prop
from properties.precision import forward_expected, range_violation
from properties.strategies import Draw

TRAIN_SAMPLES = 200
FALSE_ALARM = 1e-6
"""Per-example false-alarm probability of the unbiasedness test (Bernstein + Bonferroni)."""


def _with_dropout(caps, kind, dtype) -> Draw:
    return Draw(kind=kind, dtype=dtype, options=caps.options | {"dropout"}, dropout="positive")


def _train_draw(caps, kind, dtype) -> Draw:
    # Reflect/circular padding repeats an input element inside one window, so the masked terms of an
    # output are not independent; the variance below assumes they are.
    opts = (caps.options | {"dropout"}) - {"padding_mode", "multi_adapter"}
    return Draw(kind=kind, dtype=dtype, options=opts, dropout="positive", max_adapters=1)


@prop(
    "eval_dropout_identity",
    "In eval mode dropout is the identity for every p: the output is bit-identical to the same layer "
    "with p = 0 and matches the oracle.",
    draw=_with_dropout,
)
def eval_dropout_identity(ctx: Context) -> None:
    y = ctx.build().forward(ctx.x)
    ctx.check(y, forward_expected(ctx.spec, ctx.x, ctx.arith), "eval output with dropout")
    no_dropout = ctx.spec.with_adapters(tuple(replace(a, dropout=0.0) for a in ctx.spec.adapters))
    y0 = ctx.build(no_dropout).forward(ctx.x)
    assert_identical({"output": y0}, {"output": y}, "eval output with p > 0 vs p = 0")


def _dropped_path_weight(ctx: Context) -> torch.Tensor:
    """The weight C applied to dropout(x): ``s B A`` (plus ``(f - 1) W + (f - 1) sBA`` for DoRA)."""
    spec = ctx.spec
    a = spec.adapters[0]
    delta = oracle.lora_delta(spec, a)
    if not a.use_dora:
        return delta
    w = spec.weight.to("cpu", torch.float64)
    f = oracle.dora_factor(spec, a)
    f = f.reshape(-1, *([1] * (w.dim() - 1)))
    return (f - 1) * w + f * delta


def bernstein_radius(var: torch.Tensor, span: torch.Tensor, n: int, alpha: float) -> torch.Tensor:
    """Half-width t with P(|mean - mu| >= t) <= alpha for a mean of n i.i.d. samples whose deviation
    from mu is at most ``span`` and whose variance is ``var`` (Bernstein's inequality)."""
    L = math.log(2 / alpha)
    b = 2 * span * L / 3
    return (b + torch.sqrt(b * b + 8 * n * var * L)) / (2 * n)


@prop(
    "train_dropout_unbiased",
    "In train mode dropout touches only the LoRA input and is unbiased: the mean of many train outputs "
    f"equals the eval output (false-alarm rate <= {FALSE_ALARM:g} per example); for a one-entry input "
    "each output is base or base + LoRA/(1-p); with B = 0 every train output equals the base output.",
    requires={"train_forward"},
    draw=_train_draw,
    layers=("linear", "conv1d", "conv2d", "conv3d"),
    cost=8.0,  # TRAIN_SAMPLES + 8 forwards per example
)
def train_dropout_unbiased(ctx: Context) -> None:
    spec, x = ctx.spec, ctx.x
    a = spec.adapters[0]
    p = a.dropout
    h = ctx.build()
    ys = torch.stack(
        [h.forward(x, train=True).detach().to("cpu", torch.float64) for _ in range(TRAIN_SAMPLES)]
    )
    exp = forward_expected(spec, x, ctx.arith)
    # A kept LoRA input is x / (1 - p): its intermediates must fit the dtype too.
    exp.out_of_range = exp.out_of_range or range_violation(spec, x, ctx.arith, input_gain=1 / (1 - p))
    C = _dropped_path_weight(ctx)
    x64 = x.detach().to("cpu", torch.float64)
    var = oracle._apply(spec, C * C, x64 * x64, False) * (p / (1 - p))
    span = oracle._apply(spec, C.abs(), x64.abs(), False) * max(1.0, p / (1 - p))
    # Each train sample may be off by the rounding of a forward whose inputs are up to 1/(1-p) larger.
    rounding = exp.bound / (1 - p)
    radius = bernstein_radius(var, span, TRAIN_SAMPLES, FALSE_ALARM / max(ys[0].numel(), 1)) + rounding
    mean = ys.mean(0)
    ctx.check(
        mean,
        exp.versus(exp.exact, radius),
        f"mean of {TRAIN_SAMPLES} train outputs (p={p:g})",
        statistical=True,
    )
    _single_entry_masks(ctx, h, p)
    zero_b = spec.with_adapters(
        (replace(a, B=torch.zeros_like(a.B), bias=None, use_dora=False, magnitude=None),)
    )
    hb = ctx.build(zero_b)
    base = forward_expected(zero_b, x, ctx.arith)
    for i in range(8):
        y = hb.forward(x, train=True)
        if not torch.isfinite(y).all():
            raise PropertyFailure(f"train forward {i} with B = 0 is not finite")
        ctx.check(y, base, f"train output with B = 0 (forward {i}): dropout must not touch the base path")


PROBE_SAMPLES = 64
SURE = 1e-9  # only assert "some mask kept / dropped it" when the chance of not seeing it is below this


def _single_entry_masks(ctx: Context, h, p: float) -> None:
    """Feed an input with one non-zero entry: each train output must be exactly the base output
    (entry dropped) or the base output plus ``1/(1-p)`` times the LoRA term (kept, inverted dropout).
    This sees what a mean cannot: dropout that is not inverted, or never applied."""
    spec, x = ctx.spec, ctx.x
    probe = torch.zeros_like(x)
    flat = x.reshape(-1)
    i = int(torch.argmax(flat.abs().to(torch.float64)))
    if flat[i] == 0:
        return
    probe.reshape(-1)[i] = flat[i]
    if range_violation(spec, probe, ctx.arith, input_gain=1 / (1 - p)):
        return  # outside the claim: a kept output may overflow the dtype
    exp = forward_expected(spec, probe, ctx.arith)
    a = spec.adapters[0]
    # Dropped: the LoRA input is zero, so only the LoRA bias (if any) is left of the adapter.
    dropped = spec.with_adapters((replace(a, A=torch.zeros_like(a.A)),) if a.bias is not None else ())
    base = forward_expected(dropped, probe, ctx.arith)
    lora = exp.exact - base.exact
    if lora.abs().max() <= 2 * (exp.bound.max() / (1 - p) + base.bound.max()):
        return  # the LoRA term is lost in rounding: kept and dropped cannot be told apart
    kept_exact = base.exact + lora / (1 - p)
    tol = exp.bound / (1 - p) + base.bound
    seen = {"kept": 0, "dropped": 0}
    for _ in range(PROBE_SAMPLES):
        y = h.forward(probe, train=True).detach().to("cpu", torch.float64)
        if y.shape != kept_exact.shape:
            raise PropertyFailure(f"train output shape {tuple(y.shape)}, expected {tuple(kept_exact.shape)}")
        if ((y - kept_exact).abs() <= tol).all():
            seen["kept"] += 1
        elif ((y - base.exact).abs() <= tol).all():
            seen["dropped"] += 1
        else:
            err = float(((y - kept_exact).abs() / tol).max())
            plain = ((y - (base.exact + lora)).abs() <= tol).all()
            hint = " It equals base + LoRA: dropout not applied, or not inverted." if plain else ""
            raise PropertyFailure(
                f"single-entry input (p={p:g}): a train output is neither the base output nor base + "
                f"LoRA/(1-p) (inverted dropout); {err:.3g} x the bound away from the kept value.{hint}"
            )
    if seen["kept"] == 0 and p**PROBE_SAMPLES < SURE:
        raise PropertyFailure(f"p={p:g}: the LoRA input was dropped in all {PROBE_SAMPLES} train forwards")
    if seen["dropped"] == 0 and (1 - p) ** PROBE_SAMPLES < SURE:
        raise PropertyFailure(
            f"p={p:g}: dropout never dropped the LoRA input in {PROBE_SAMPLES} train forwards"
        )
