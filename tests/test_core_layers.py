"""Forward passes and deltas of every lora_core layer against float64 formulas written out here."""

import copy

import pytest
import torch
from torch import nn

import lora_core
from lora_core import LoraConfig

TIGHT = dict(rtol=1e-12, atol=1e-12)


def wrapped(base, *adapters, **wrap_kwargs):
    """Float64 layer with random factors for each ``(name, config-kwargs)``; eval mode."""
    layer = lora_core.wrap(base.double(), **wrap_kwargs)
    for name, kwargs in adapters:
        layer.add_adapter(name, LoraConfig(init_lora_weights=False, **kwargs))
    return layer.eval()


def factors(layer, name):
    return layer.lora_A[name].detach(), layer.lora_B[name].detach(), layer.scaling[name]


def check_merge_agrees(layer, *inputs):
    """Merged and unmerged eval outputs agree, and unmerge restores the output."""
    before = layer(*inputs)
    layer.merge()
    torch.testing.assert_close(layer(*inputs), before, **TIGHT)
    layer.unmerge()
    torch.testing.assert_close(layer(*inputs), before, **TIGHT)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_several_adapters_rslora_and_bias(bias):
    torch.manual_seed(0)
    adapters = [("a", dict(r=3, lora_alpha=5.0)), ("b", dict(r=4, lora_alpha=2.0, use_rslora=True))]
    if bias:
        adapters.append(("c", dict(r=2, lora_alpha=3.0, lora_bias=True)))
    layer = wrapped(nn.Linear(6, 5, bias=bias), *adapters)
    assert layer.scaling["a"] == 5.0 / 3 and layer.scaling["b"] == 2.0 / 2.0
    x = torch.randn(7, 6, dtype=torch.float64)
    w = layer.base_layer.weight.detach()
    expected = x @ w.T + (layer.base_layer.bias.detach() if bias else 0)
    for name, _ in adapters:
        a, b, s = factors(layer, name)
        expected = expected + s * (x @ a.T) @ b.T
        if name == "c":
            expected = expected + s * layer.lora_bias["c"].detach()
    torch.testing.assert_close(layer(x), expected, **TIGHT)
    a, b, s = factors(layer, "a")
    torch.testing.assert_close(layer.get_delta_weight("a"), s * b @ a, **TIGHT)
    if bias:
        deltas = layer.get_delta_weights("c")
        assert set(deltas) == {"weight", "bias"}
        torch.testing.assert_close(
            deltas["bias"], layer.scaling["c"] * layer.lora_bias["c"].detach(), **TIGHT
        )
    check_merge_agrees(layer, x)


@pytest.mark.parametrize("module", ["lora_core", "named"])
def test_conv1d_fan_in_fan_out(module):
    torch.manual_seed(1)
    # any class called Conv1D with a 2-D weight (like transformers') is dispatched as well
    cls = lora_core.Conv1D if module == "lora_core" else type("Conv1D", (lora_core.Conv1D,), {})
    base = cls(6, 4)
    layer = wrapped(base, ("a", dict(r=2, lora_alpha=3.0, use_dora=False)), fan_in_fan_out=True)
    assert isinstance(layer, lora_core.Linear) and layer.fan_in_fan_out
    a, b, s = factors(layer, "a")
    assert a.shape == (2, 6) and b.shape == (4, 2)
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    w, bias = base.weight.detach(), base.bias.detach()
    torch.testing.assert_close(layer(x), x @ w + bias + s * (x @ a.T) @ b.T, **TIGHT)
    assert layer.get_delta_weight("a").shape == (6, 4)
    torch.testing.assert_close(layer.get_delta_weight("a"), s * (b @ a).T, **TIGHT)
    check_merge_agrees(layer, x)


def test_fan_in_fan_out_is_corrected_with_a_warning_like_peft():
    with pytest.warns(UserWarning, match="fan_in_fan_out=True does not fit Linear"):
        layer = lora_core.wrap(nn.Linear(3, 2), fan_in_fan_out=True)
    assert not layer.fan_in_fan_out
    with pytest.warns(UserWarning, match="fan_in_fan_out=False does not fit Conv1D"):
        layer = lora_core.wrap(lora_core.Conv1D(3, 2))
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (3, 2)


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding(padding_idx):
    torch.manual_seed(2)
    layer = wrapped(nn.Embedding(9, 4, padding_idx=padding_idx), ("a", dict(r=3, lora_alpha=4.0)))
    a, b, s = factors(layer, "a")
    assert a.shape == (3, 9) and b.shape == (4, 3)
    ids = torch.tensor([[0, 2, 8], [2, 5, 1]])
    w = layer.base_layer.weight.detach()
    torch.testing.assert_close(layer(ids), w[ids] + s * a.T[ids] @ b.T, **TIGHT)
    torch.testing.assert_close(layer.get_delta_weight("a"), s * (b @ a).T, **TIGHT)
    layer(ids).sum().backward()
    grad_at_pad = layer.lora_A["a"].grad[:, 2]
    assert (grad_at_pad.abs().sum() == 0) == (padding_idx == 2)  # padding_idx only stops gradients
    check_merge_agrees(layer, ids)


def test_default_init_is_a_no_op_like_peft():
    for base in (nn.Linear(4, 3), nn.Conv2d(2, 4, 3), nn.Embedding(5, 3)):
        layer = lora_core.wrap(base)
        layer.add_adapter("a", LoraConfig(r=2))
        zero = layer.lora_A["a"] if isinstance(base, nn.Embedding) else layer.lora_B["a"]
        other = layer.lora_B["a"] if isinstance(base, nn.Embedding) else layer.lora_A["a"]
        assert torch.count_nonzero(zero) == 0 and torch.count_nonzero(other) > 0


def conv_ref(base, x, weight, bias):
    """Run the base conv (torch's own implementation) with replaced weight and bias."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref.weight.copy_(weight)
        if bias is not None:
            ref.bias.copy_(bias)
    return ref(x)


def grouped_delta(a, b, s, groups):
    """delta[o, i, k] = s * sum_{j in group(o)} B[o, j] A[j, i, k], written out with loops."""
    out, r = b.shape[0], a.shape[0]
    delta = torch.zeros(out, *a.shape[1:], dtype=a.dtype)
    for o in range(out):
        g = o // (out // groups)
        for jl in range(r // groups):
            delta[o] += b[o, jl].reshape(()) * a[g * (r // groups) + jl]
    return s * delta


CONV_CASES = [
    (1, dict(kernel_size=1)),
    (1, dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect")),
    (1, dict(kernel_size=3, padding="same", dilation=2, padding_mode="circular")),
    (2, dict(kernel_size=3, stride=(2, 1), padding=(1, 2), groups=2, padding_mode="replicate")),
    (2, dict(kernel_size=(3, 2), padding="valid", dilation=(1, 2), groups=2)),
    (2, dict(kernel_size=3, padding="same", padding_mode="zeros", bias=False)),
    (3, dict(kernel_size=2, stride=1, padding=1, groups=2, padding_mode="circular")),
    (3, dict(kernel_size=(1, 3, 3), padding="same", padding_mode="reflect")),
]


@pytest.mark.parametrize("dims,options", CONV_CASES)
def test_conv(dims, options):
    torch.manual_seed(3)
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    groups = options.get("groups", 1)
    has_bias = options.get("bias", True)
    adapters = [("a", dict(r=2 * groups, lora_alpha=3.0, lora_bias=has_bias)), ("b", dict(r=groups))]
    layer = wrapped(conv_cls(4, 6, **options), *adapters)
    assert type(layer).__name__ == f"Conv{dims}d"
    x = torch.randn(2, 4, *[7] * dims, dtype=torch.float64)
    base = layer.base_layer
    weight, bias = base.weight.detach(), None if base.bias is None else base.bias.detach()
    for name, _ in adapters:
        a, b, s = factors(layer, name)
        assert a.shape == (2 * groups if name == "a" else groups, 4 // groups, *base.kernel_size)
        assert b.shape == (6, a.shape[0] // groups, *[1] * dims)
        delta = grouped_delta(a, b, s, groups)
        torch.testing.assert_close(layer.get_delta_weight(name), delta, **TIGHT)
        weight = weight + delta
    if has_bias:
        bias = bias + layer.scaling["a"] * layer.lora_bias["a"].detach()
    torch.testing.assert_close(layer(x), conv_ref(base, x, weight, bias), **TIGHT)
    check_merge_agrees(layer, x)


def dora_rows(weight_out_major, magnitude):
    """DoRA's merged weight m/n * V with n the norm of each output row of V."""
    norm = weight_out_major.flatten(1).norm(dim=1)
    return weight_out_major * (magnitude / norm).view(-1, *[1] * (weight_out_major.dim() - 1))


def test_dora_linear_eval_formula_and_merge():
    torch.manual_seed(4)
    layer = wrapped(nn.Linear(5, 4), ("a", dict(r=2, lora_alpha=3.0, use_dora=True)))
    a, b, s = factors(layer, "a")
    w, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach()
    m = torch.rand(4, dtype=torch.float64) + 0.5
    layer.load_factors("a", magnitude=m)
    x = torch.randn(3, 5, dtype=torch.float64)
    merged = dora_rows(w + s * b @ a, m)
    torch.testing.assert_close(layer(x), x @ merged.T + bias, **TIGHT)
    torch.testing.assert_close(layer.get_delta_weight("a"), merged - w, **TIGHT)
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), merged, **TIGHT)
    torch.testing.assert_close(layer._caches["a-weight_norm"], (w + s * b @ a).norm(dim=1), **TIGHT)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), w, **TIGHT)
    assert "a-weight_norm" not in layer._caches


def test_dora_init_magnitude_makes_adapter_start_as_lora():
    torch.manual_seed(5)
    layer = wrapped(nn.Linear(5, 4), ("a", dict(r=2, use_dora=True)))
    a, b, s = factors(layer, "a")
    w = layer.base_layer.weight.detach()
    torch.testing.assert_close(layer.lora_magnitude["a"].detach(), (w + s * b @ a).norm(dim=1), **TIGHT)
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ (w + s * b @ a).T + layer.base_layer.bias, **TIGHT)


def test_dora_conv_and_embedding_and_conv1d():
    torch.manual_seed(6)
    conv = wrapped(nn.Conv2d(4, 6, 3, padding=1, groups=2), ("a", dict(r=2, use_dora=True)))
    a, b, s = factors(conv, "a")
    m = torch.rand(6, dtype=torch.float64) + 0.5
    conv.load_factors("a", magnitude=m)
    weight = conv.base_layer.weight.detach()
    merged = dora_rows(weight + grouped_delta(a, b, s, 2), m)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(conv(x), conv_ref(conv.base_layer, x, merged, conv.base_layer.bias), **TIGHT)
    check_merge_agrees(conv, x)

    emb = wrapped(nn.Embedding(7, 3), ("a", dict(r=2, use_dora=True)))
    a, b, s = factors(emb, "a")
    m = torch.rand(3, dtype=torch.float64) + 0.5
    emb.load_factors("a", magnitude=m)
    assert emb.lora_magnitude["a"].shape == (3,)
    total = emb.base_layer.weight.detach() + s * (b @ a).T  # (num, dim); norm per dim column
    merged = total * (m / total.norm(dim=0))
    ids = torch.tensor([[1, 6, 0]])
    torch.testing.assert_close(emb(ids), merged[ids], **TIGHT)
    check_merge_agrees(emb, ids)

    gpt = wrapped(lora_core.Conv1D(5, 3), ("a", dict(r=2, use_dora=True)), fan_in_fan_out=True)
    a, b, s = factors(gpt, "a")
    m = torch.rand(3, dtype=torch.float64) + 0.5
    gpt.load_factors("a", magnitude=m)
    merged = dora_rows(gpt.base_layer.weight.detach().T + s * b @ a, m)  # out-major (out, in)
    x = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(gpt(x), x @ merged.T + gpt.base_layer.bias, **TIGHT)
    torch.testing.assert_close(gpt.get_delta_weight("a"), merged.T - gpt.base_layer.weight, **TIGHT)


def test_dora_magnitude_gets_gradients_and_norm_is_constant():
    torch.manual_seed(7)
    layer = wrapped(nn.Linear(4, 3), ("a", dict(r=2, use_dora=True)))
    layer(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    for store in (layer.lora_magnitude, layer.lora_A, layer.lora_B):
        assert store["a"].grad is not None and store["a"].grad.abs().sum() > 0


def test_dropout_only_on_lora_branch_with_train_statistics():
    torch.manual_seed(8)
    n, p = 64, 0.25
    layer = wrapped(nn.Linear(n, n), ("a", dict(r=n, lora_alpha=float(n), lora_dropout=p)))
    eye = torch.eye(n, dtype=torch.float64)
    layer.load_factors("a", A=eye, B=eye)  # lora branch == dropout(x)
    x = torch.rand(100, n, dtype=torch.float64) + 1.0
    base = layer.base_layer(x)
    torch.testing.assert_close(layer(x), base + x, **TIGHT)  # eval: no dropout
    layer.train()
    extra = layer(x) - base
    kept = (extra - x / (1 - p)).abs() < 1e-9
    dropped = extra.abs() < 1e-9
    assert torch.all(kept ^ dropped)  # base path untouched; lora branch is 0 or x/(1-p)
    assert abs(dropped.double().mean().item() - p) < 0.02


def test_mixed_batch_rows():
    torch.manual_seed(9)
    layer = wrapped(nn.Linear(4, 3), ("a", dict(r=2)), ("b", dict(r=3, lora_alpha=2.0)))
    x = torch.randn(4, 4, dtype=torch.float64)
    names = ["b", "__base__", "a", "b"]
    out = layer(x, adapter_names=names)
    base = layer.base_layer(x)
    for i, name in enumerate(names):
        expected = base[i]
        if name != "__base__":
            a, b, s = factors(layer, name)
            expected = expected + s * b @ (a @ x[i])
        torch.testing.assert_close(out[i], expected, **TIGHT)


def mha_ref(base, weights, query, key, value, **kwargs):
    """torch's own MultiheadAttention with the merged weights written in by hand."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref.in_proj_weight.copy_(weights["in"])
        ref.out_proj.weight.copy_(weights["out"])
    return ref(query, key, value, **kwargs)


def manual_attention(base, w_in, w_out, x, heads):
    """Batch-first self-attention written out: project, split heads, softmax(QK^T/sqrt(d))V, project."""
    n, length, e = x.shape
    q, k, v = (x @ w_in.T + base.in_proj_bias).split(e, dim=-1)
    q, k, v = (t.reshape(n, length, heads, e // heads).transpose(1, 2) for t in (q, k, v))
    att = torch.softmax(q @ k.transpose(-1, -2) / (e // heads) ** 0.5, dim=-1)
    out = (att @ v).transpose(1, 2).reshape(n, length, e)
    return out @ w_out.T + base.out_proj.bias, att.mean(dim=1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_unmerged_forward(batch_first):
    torch.manual_seed(10)
    base = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    layer = wrapped(base, ("a", dict(r=2, lora_alpha=3.0)), ("b", dict(r=1)))
    w_in, w_out = base.in_proj_weight.detach().clone(), base.out_proj.weight.detach().clone()
    for name in ("a", "b"):
        a, b, s = factors(layer, name)
        assert b.shape == (24, 2 if name == "a" else 1)
        w_in = w_in + s * b @ a
        w_out = w_out + s * layer.lora_out_B[name].detach() @ layer.lora_out_A[name].detach()
    deltas = layer.get_delta_weights("a")
    assert set(deltas) == {"in_proj_weight", "out_proj.weight"}
    x = torch.randn(3, 5, 8, dtype=torch.float64)  # batch-first
    xin = x if batch_first else x.transpose(0, 1)
    out, att = layer(xin, xin, xin)
    exp_out, exp_att = manual_attention(base, w_in, w_out, x, 2)
    torch.testing.assert_close(out if batch_first else out.transpose(0, 1), exp_out, **TIGHT)
    torch.testing.assert_close(att, exp_att, **TIGHT)

    q, kv = torch.randn(2, *xin.shape, dtype=torch.float64)
    for mask in (torch.rand(5, 5, dtype=torch.float64), torch.rand(5, 5) > 0.7, torch.rand(6, 5, 5) > 0.8):
        kpm = torch.tensor([[False] * 4 + [True]] * 3)
        if mask.dtype == torch.bool:
            mask[..., 0] = False  # keep every row attendable
        else:
            kpm = torch.rand(3, 5, dtype=torch.float64)
        for kwargs in (
            dict(attn_mask=mask, key_padding_mask=kpm),
            dict(attn_mask=mask, need_weights=True, average_attn_weights=False),
            dict(key_padding_mask=kpm, need_weights=False),
        ):
            got = layer(q, kv, kv, **kwargs)
            exp = mha_ref(base, {"in": w_in, "out": w_out}, q, kv, kv, **kwargs)
            torch.testing.assert_close(got[0], exp[0], **TIGHT)
            if exp[1] is None:
                assert got[1] is None
            else:
                torch.testing.assert_close(got[1], exp[1], **TIGHT)
    unbatched = torch.randn(5, 8, dtype=torch.float64)
    check_merge_agrees(layer, unbatched, unbatched, unbatched)


def test_mha_does_not_merge_for_its_unmerged_forward():
    torch.manual_seed(11)
    layer = wrapped(nn.MultiheadAttention(4, 1), ("a", dict(r=2)))
    before = layer.base_layer.in_proj_weight.detach().clone()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    layer(x, x, x)[0].sum().backward()
    assert torch.equal(layer.base_layer.in_proj_weight.detach(), before)
    assert layer.lora_A["a"].grad.abs().sum() > 0 and layer.lora_out_B["a"].grad.abs().sum() > 0


def test_mha_mixed_batch():
    torch.manual_seed(12)
    base = nn.MultiheadAttention(4, 2, batch_first=True)
    layer = wrapped(base, ("a", dict(r=2)))
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    out, _ = layer(x, x, x, adapter_names=["__base__", "a"])
    torch.testing.assert_close(out[0], base(x[:1], x[:1], x[:1])[0][0], **TIGHT)
    torch.testing.assert_close(out[1], layer(x[1:], x[1:], x[1:])[0][0], **TIGHT)


def test_half_precision_forward_runs_in_base_dtype():
    torch.manual_seed(13)
    for base, x in (
        (nn.Linear(4, 3), torch.randn(2, 4)),
        (nn.Conv2d(2, 4, 3, padding="same", padding_mode="reflect"), torch.randn(1, 2, 5, 5)),
        (nn.Conv3d(2, 2, 1), torch.randn(1, 2, 2, 2, 2)),
    ):
        for dtype in (torch.float16, torch.bfloat16):
            layer = lora_core.wrap(copy.deepcopy(base).to(dtype))
            layer.add_adapter("a", LoraConfig(r=2, init_lora_weights=False, use_dora=True))
            assert layer.lora_A["a"].dtype == dtype and layer.lora_magnitude["a"].dtype == dtype
            out = layer(x.to(dtype))
            ref = lora_core.wrap(copy.deepcopy(layer.base_layer).double())
            ref.add_adapter("a", LoraConfig(r=2, use_dora=True))
            ref.load_factors(
                "a", A=layer.lora_A["a"], B=layer.lora_B["a"], magnitude=layer.lora_magnitude["a"]
            )
            assert out.dtype == dtype
            torch.testing.assert_close(out.double(), ref(x.double()), rtol=0.05, atol=0.05)


def test_inject_replaces_submodules():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    layers = lora_core.inject(model, ["0", "2.0"], LoraConfig(r=2))
    assert isinstance(model[0], lora_core.Linear) and isinstance(model[2][0], lora_core.Linear)
    assert set(layers) == {"0", "2.0"} and model[0].active_adapters == ["default"]
    with pytest.raises(ValueError, match="no submodule"):
        lora_core.inject(model, ["nope"], LoraConfig(r=2))


@pytest.mark.parametrize(
    "base,x",
    [
        (nn.Conv2d(2, 4, 3, padding=1, groups=2), torch.randn(3, 2, 4, 4)),
        (nn.Embedding(6, 3, padding_idx=0), torch.tensor([[0, 1], [5, 2], [3, 3]])),
        (lora_core.Conv1D(4, 3), torch.randn(3, 2, 4)),
    ],
)
def test_mixed_batch_matches_single_adapter_runs_with_dora(base, x):
    torch.manual_seed(14)
    adapters = ("a", dict(r=2, use_dora=True)), ("b", dict(r=2, lora_alpha=5.0))
    layer = wrapped(base, *adapters, fan_in_fan_out=isinstance(base, lora_core.Conv1D))
    x = x.double() if x.is_floating_point() else x
    out = layer(x, adapter_names=["a", "__base__", "b"])
    torch.testing.assert_close(out[1], layer.base_layer(x[1:2])[0], **TIGHT)
    for row, name in ((0, "a"), (2, "b")):
        layer.set_adapter(name)
        torch.testing.assert_close(out[row], layer(x[row : row + 1])[0], **TIGHT)
        assert not torch.allclose(out[row], layer.base_layer(x[row : row + 1])[0])


def test_delta_weights_are_in_base_dtype():
    for dtype in (torch.float16, torch.bfloat16):
        layer = lora_core.wrap(nn.Linear(4, 3).to(dtype))
        layer.add_adapter("a", LoraConfig(r=2, init_lora_weights=False, lora_bias=True))
        deltas = layer.get_delta_weights("a")
        assert {k: v.dtype for k, v in deltas.items()} == {"weight": dtype, "bias": dtype}
        exact = layer.scaling["a"] * layer.lora_B["a"].float() @ layer.lora_A["a"].float()
        assert torch.equal(deltas["weight"], exact.to(dtype))
