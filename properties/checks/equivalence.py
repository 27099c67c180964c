"""Numbers: the target's outputs and weights against the float64 oracle, and against each other."""

from __future__ import annotations

from dataclasses import replace

import torch
from hypothesis import strategies as st

from properties import bias, oracle
from properties.catalogue import Context, PropertyFailure, prop
from properties.precision import delta_expected, forward_expected, mixed_expected, weights_expected
from properties.spec import BASE_ROW
from properties.strategies import Draw


@prop("reference_forward", "Unmerged eval output agrees with the float64 oracle within the precision bound.")
def reference_forward(ctx: Context) -> None:
    h = ctx.build()
    y = h.forward(ctx.x)
    ctx.check(y, forward_expected(ctx.spec, ctx.x, ctx.arith), "unmerged output")
    spec, x = ctx.spec, ctx.x
    if bias.applies(spec, spec.active_adapters):
        cands = bias.unmerged_candidates(spec, x)
        blocks = bias.position_blocks(spec, x)  # one block per distinct input window
        tally = bias.tally(
            "unmerged output", y, cands, bias.lora_part(spec, x), bias.feature_dim(spec), blocks
        )
        ctx.check_bias(tally)


BASE_LAYER_OPTIONS = frozenset(
    {"fan_in_fan_out", "padding_idx", "conv_groups", "conv_dilation", "padding_mode", "padding_same"}
)


def _all_base_options(caps, kind, dtype) -> Draw:
    return Draw(kind=kind, dtype=dtype, options=caps.options | BASE_LAYER_OPTIONS)


@prop(
    "layer_options_honoured",
    "Every base-layer option a library accepts (conv stride, padding, 'same', dilation, groups, padding "
    "modes; padding_idx; fan_in_fan_out) is honoured by the LoRA branch: unmerged output = oracle.",
    draw=_all_base_options,
    layers=("linear", "embedding", "conv1d", "conv2d", "conv3d"),
)
def layer_options_honoured(ctx: Context) -> None:
    h = ctx.build()
    ctx.check(h.forward(ctx.x), forward_expected(ctx.spec, ctx.x, ctx.arith), "unmerged output")


@prop(
    "reference_delta",
    "get_delta_weight equals scaling * B @ A (groups, transposes and DoRA included), rounded once.",
    requires={"delta_weight"},
)
def reference_delta(ctx: Context) -> None:
    h = ctx.build()
    for a in ctx.spec.adapters:
        actual = h.delta_weights(a.name)
        ctx.check_weights(actual, delta_expected(ctx.spec, a.name, ctx.arith), f"delta {a.name}")
        if not a.use_dora:  # one test per adapter: a bias may lean a different way in each
            exact = oracle.delta_weights(ctx.spec, a.name)
            ctx.check_bias(bias.weight_tally("delta", actual, bias.delta_candidates(ctx.spec, a.name), exact))


@prop(
    "merge_equivalence",
    "Merged and unmerged eval outputs agree with each other and with the oracle.",
    requires={"merge"},
)
def merge_equivalence(ctx: Context) -> None:
    h = ctx.build()
    expected = forward_expected(ctx.spec, ctx.x, ctx.arith)
    unmerged = h.forward(ctx.x)
    h.merge()
    merged = h.forward(ctx.x)
    both = expected.versus(unmerged.detach().to("cpu", torch.float64), 2 * expected.bound)
    ctx.check(merged, both, "merged vs unmerged output")
    ctx.check(merged, expected, "merged output")
    names = ctx.spec.active_adapters
    weights = h.weights()
    ctx.check_weights(weights, weights_expected(ctx.spec, names, ctx.arith), "merged weights")
    spec, x = ctx.spec, ctx.x
    if not any(spec.adapter(n).use_dora for n in names):
        exact = oracle.merged_weights(spec, names)
        base = {k: v.detach().to("cpu", torch.float64) for k, v in spec.base_tensors().items()}
        moved = {k: exact[k] - base[k] for k in exact}
        cands = bias.merged_candidates(spec, names)
        ctx.check_bias(bias.weight_tally("merged weights", weights, cands, moved))
    if spec.kind != "mha":
        cand = {"round(W' x + b')": bias.merged_output_candidate(spec, x, weights)}
        blocks = bias.position_blocks(spec, x)  # one block per distinct input window
        tally = bias.tally(
            "merged output", merged, cand, bias.lora_part(spec, x), bias.feature_dim(spec), blocks
        )
        ctx.check_bias(tally)


@prop(
    "merge_and_unload",
    "merge_and_unload returns a plain module of the base's type whose output equals the merged layer's.",
    requires={"merge_and_unload"},
)
def merge_and_unload(ctx: Context) -> None:
    h = ctx.build()
    module = h.merge_and_unload()
    base_type = {
        "linear": (torch.nn.Linear,),
        "embedding": (torch.nn.Embedding,),
        "conv1d": (torch.nn.Conv1d,),
        "conv2d": (torch.nn.Conv2d,),
        "conv3d": (torch.nn.Conv3d,),
        "mha": (torch.nn.MultiheadAttention,),
    }[ctx.spec.kind]
    if ctx.spec.fan_in_fan_out:
        base_type = (torch.nn.Module,)
    if not isinstance(module, base_type) or any("lora" in n.lower() for n, _ in module.named_parameters()):
        raise PropertyFailure(f"merge_and_unload returned {type(module).__name__} with LoRA parameters left")
    with torch.no_grad():
        if ctx.spec.kind == "mha":
            module.eval()
            y = module(ctx.x, ctx.x, ctx.x, need_weights=False)[0]
        else:
            y = module.eval()(ctx.x)
    ctx.check(y, forward_expected(ctx.spec, ctx.x, ctx.arith), "unloaded module output")


def _mixed_draw(caps, kind, dtype) -> Draw:
    return Draw(kind=kind, dtype=dtype, options=caps.options | {"multi_adapter"}, min_batch=1)


@prop(
    "mixed_batch",
    "Each row of a mixed-batch forward equals a forward with that row's adapter alone (or none).",
    requires={"mixed_batch"},
    draw=_mixed_draw,
    needs_data=True,
)
def mixed_batch(ctx: Context) -> None:
    if not ctx.x.is_floating_point() and ctx.x.dim() == 0:
        raise PropertyFailure("mixed batch needs a batch dimension")
    names = [*ctx.spec.adapter_names, BASE_ROW]
    rows = ctx.draw(
        st.lists(st.sampled_from(names), min_size=ctx.x.shape[0], max_size=ctx.x.shape[0]), "rows"
    )
    h = ctx.build()
    y = h.forward(ctx.x, adapter_names=rows)
    ctx.check(y, mixed_expected(ctx.spec, ctx.x, rows, ctx.arith), "mixed-batch output")
    for i, name in enumerate(rows):
        single = replace(ctx.spec, active=() if name == BASE_ROW else (name,))
        if name == BASE_ROW:
            continue
        solo = ctx.build(single).forward(ctx.x[i : i + 1])
        exp = forward_expected(single, ctx.x[i : i + 1], ctx.arith)
        both = exp.versus(solo.detach().to("cpu", torch.float64), 2 * exp.bound)
        ctx.check(y[i : i + 1], both, f"row {i} ({name}) vs single-adapter forward")
