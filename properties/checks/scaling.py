"""Switches: disabling adapters and changing their scale."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from properties import oracle
from properties.catalogue import Context, assert_identical, prop
from properties.precision import forward_expected, roundtrip_expected

SCALES = (0.0, 0.5, 2.0, -1.0, 3.25)


@prop(
    "disable_exact",
    "Disabled adapters give the base output (also after a merge); enabling them again restores LoRA.",
    requires={"disable"},
)
def disable_exact(ctx: Context) -> None:
    spec, x = ctx.spec, ctx.x
    base = forward_expected(spec, x, ctx.arith, adapters=[])
    h = ctx.build()
    h.set_enabled(False)
    ctx.check(h.forward(x), base, "disabled output")
    h.set_enabled(True)
    ctx.check(h.forward(x), forward_expected(spec, x, ctx.arith), "re-enabled output")
    if "merge" not in ctx.target.capabilities().operations:
        return
    if spec.kind == "mha":
        return  # attention is not linear in the weights: the slack below does not apply
    h.merge()
    h.set_enabled(False)
    # The merged weights must come back out: the round trip's weight error, applied to |x|.
    rt = roundtrip_expected(spec, spec.active_adapters, ctx.arith)
    x_abs = x.detach().to("cpu", torch.float64).abs() if x.is_floating_point() else x
    slack = oracle._apply(spec, rt["weight"].bound, x_abs, True)
    if "bias" in rt:
        slack = slack + oracle._out_view(spec, rt["bias"].bound, slack.dim())
    expected = base.versus(base.exact, base.bound + slack)
    expected.out_of_range = expected.out_of_range or rt["weight"].out_of_range
    ctx.check(h.forward(x), expected, "disabled output after merge")


@prop(
    "set_scale_identity",
    "set_scale(name, 1.0) is a no-op: outputs stay bit-identical.",
    requires={"set_scale"},
)
def set_scale_identity(ctx: Context) -> None:
    h = ctx.build()
    before = h.forward(ctx.x)
    for a in ctx.spec.adapters:
        h.set_scale(a.name, 1.0)
    assert_identical({"output": before}, {"output": h.forward(ctx.x)}, "output after set_scale(1.0)")


@prop(
    "scaling_law",
    "set_scale(name, c) makes the scaling c * alpha / r (alpha / sqrt(r) with rsLoRA); scale_layer(f) "
    "multiplies it, unscale_layer(f) divides it back and unscale_layer() resets it.",
    requires={"set_scale"},
    needs_data=True,
)
def scaling_law(ctx: Context) -> None:
    spec, x = ctx.spec, ctx.x
    name = ctx.draw(st.sampled_from(spec.active_adapters), "adapter")
    c = ctx.draw(st.sampled_from(SCALES), "scale")
    h = ctx.build()
    h.set_scale(name, c)
    ctx.check(
        h.forward(x), forward_expected(spec, x, ctx.arith, scales={name: c}), f"after set_scale({name}, {c})"
    )
    if "scale_layer" not in ctx.target.capabilities().operations:
        return
    f = ctx.draw(st.sampled_from((0.5, 2.0, 3.0)), "factor")
    h.scale_layer(f)
    scaled = {n: f * (c if n == name else 1.0) for n in spec.active_adapters}
    ctx.check(h.forward(x), forward_expected(spec, x, ctx.arith, scales=scaled), f"after scale_layer({f})")
    h.unscale_layer(f)
    ctx.check(
        h.forward(x), forward_expected(spec, x, ctx.arith, scales={name: c}), f"after unscale_layer({f})"
    )
    h.unscale_layer(None)
    ctx.check(h.forward(x), forward_expected(spec, x, ctx.arith), "after unscale_layer()")
