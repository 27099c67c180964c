"""The library targets against explicit float64 LoRA formulas (each skips where its library is missing).

Run inside a library's environment, e.g. ``python scripts/envs.py run lycoris -- python -m pytest
tests/test_library_targets.py``. Everything is float64, so comparisons use tight tolerances: a target
that loads a factor transposed, in the wrong slot or with the wrong scaling is off by O(1).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from properties.spec import AdapterSpec, ConvOptions, LayerSpec

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)

LIBRARIES = {
    "loralib": "loralib",
    "torchtune": "torchtune",
    "litgpt": "litgpt",
    "diffusers": "diffusers",
    "lycoris": "lycoris",
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _target(lib: str):
    if not _installed(LIBRARIES[lib]):
        pytest.skip(f"{lib} is not installed here (python scripts/envs.py create {lib})")
    return importlib.import_module(f"properties.targets.{lib}_target").TARGET


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def linear_spec(*, r=2, alpha=3.0, bias=True, fan_in_fan_out=False, dora=False, seed=0) -> LayerSpec:
    g = torch.Generator().manual_seed(seed)
    w, A, B = _rand(g, 5, 4), _rand(g, r, 4), _rand(g, 5, r)
    mag = (w + alpha / r * B @ A).norm(dim=1) * 1.5 if dora else None
    adapter = AdapterSpec("default", r, alpha, A, B, use_dora=dora, magnitude=mag)
    b = _rand(g, 5) if bias else None
    return LayerSpec("linear", F64, w, (adapter,), base_bias=b, fan_in_fan_out=fan_in_fan_out)


def conv2d_spec(*, groups=1, k=3, r=2, alpha=3.0, dilation=1, seed=0) -> LayerSpec:
    g = torch.Generator().manual_seed(seed)
    cin, cout = 2 * groups, 2 * groups
    conv = ConvOptions((k, k), (1, 1), (1, 1), (dilation, dilation), groups, "zeros")
    w = _rand(g, cout, cin // groups, k, k)
    A, B = _rand(g, r * groups, cin // groups, k, k), _rand(g, cout, r, 1, 1)
    adapter = AdapterSpec("default", r * groups, alpha, A, B)
    return LayerSpec("conv2d", F64, w, (adapter,), base_bias=_rand(g, cout), conv=conv)


def linear_delta(spec: LayerSpec) -> torch.Tensor:
    a = spec.adapters[0]
    return a.scaling * a.B @ a.A


def linear_expected(spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b + s (x A^T) B^T``, or the DoRA form ``m / ||W + sBA|| * (x (W + sBA)^T) + b``."""
    a = spec.adapters[0]
    bias = spec.base_bias if spec.base_bias is not None else 0.0
    if a.use_dora:
        merged = spec.weight + linear_delta(spec)
        return (a.magnitude / merged.norm(dim=1)) * (x @ merged.T) + bias
    return x @ spec.weight.T + bias + a.scaling * (x @ a.A.T) @ a.B.T


def conv_delta(spec: LayerSpec) -> torch.Tensor:
    """The grouped delta ``s B∘A`` written out group by group."""
    a, g = spec.adapters[0], spec.conv.groups
    out, per_r = a.B.shape[0], a.r // g
    rows = out // g
    blocks = [
        a.B[i * rows : (i + 1) * rows, :, 0, 0] @ a.A[i * per_r : (i + 1) * per_r].flatten(1)
        for i in range(g)
    ]
    return a.scaling * torch.cat(blocks).reshape(spec.weight.shape)


def conv_expected(spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    c = spec.conv
    w = spec.weight + conv_delta(spec)
    return F.conv2d(x, w, spec.base_bias, c.stride, c.padding, c.dilation, c.groups)


X = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=F64)


# -- every target ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lib", sorted(LIBRARIES))
def test_missing_library_names_the_install_command(lib):
    module = importlib.import_module(f"properties.targets.{lib}_target")
    if _installed(LIBRARIES[lib]):
        caps = module.TARGET.capabilities()
        assert "linear" in caps.layers
        assert caps.operations and all(isinstance(v, str) and v for v in caps.notes.values())
    else:
        with pytest.raises(ImportError, match="pip install"):
            module.TARGET.capabilities()


@pytest.mark.parametrize("lib", sorted(LIBRARIES))
def test_linear_forward_and_merge_match_the_formula(lib):
    target = _target(lib)
    spec = linear_spec()
    h = target.build(spec)
    torch.testing.assert_close(h.forward(X), linear_expected(spec, X), **TOL)
    assert h.merged_adapters() == []
    h.merge()
    assert h.merged_adapters() == ["default"]
    torch.testing.assert_close(h.weights()["weight"], spec.weight + linear_delta(spec), **TOL)
    torch.testing.assert_close(h.weights()["bias"], spec.base_bias, rtol=0, atol=0)
    torch.testing.assert_close(h.forward(X), linear_expected(spec, X), **TOL)


@pytest.mark.parametrize("lib", sorted(LIBRARIES))
def test_forward_never_reseeds_torch(lib):
    """The runner seeds once per example; a target that reseeds per forward makes every mask equal."""
    target = _target(lib)
    spec = linear_spec()
    spec = spec.with_adapters((dataclasses.replace(spec.adapters[0], dropout=0.5),))
    h = target.build(spec)
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        h.forward(X, train=True)
        draws.append(torch.rand(8))
    assert not torch.equal(draws[0], draws[1]), "a forward reseeded torch"
    if lib != "lycoris":  # LyCORIS' rebuild forward never applies dropout (findings/libraries.md)
        torch.manual_seed(3)
        x = X.repeat(64, 1)
        assert not torch.equal(h.forward(x, train=True), h.forward(x, train=True)), "identical dropout masks"


# -- loralib --------------------------------------------------------------------------------------


def test_loralib_fan_in_fan_out_and_unmerge():
    target = _target("loralib")
    spec = linear_spec(fan_in_fan_out=True)
    h = target.build(spec)
    assert h.layer.weight.shape == (4, 5)  # stored (in, out)
    torch.testing.assert_close(h.forward(X), linear_expected(spec, X), **TOL)
    h.merge()
    h.forward(X, train=True)  # a train-mode forward must not unmerge (loralib's train() would)
    assert h.merged_adapters() == ["default"]
    h.unmerge()
    torch.testing.assert_close(h.weights()["weight"], spec.weight, **TOL)
    torch.testing.assert_close(h.forward(X), linear_expected(spec, X), **TOL)


def test_loralib_embedding_uses_canonical_factors():
    target = _target("loralib")
    g = torch.Generator().manual_seed(2)
    w, A, B = _rand(g, 6, 3), _rand(g, 2, 6), _rand(g, 3, 2)
    spec = LayerSpec("embedding", F64, w, (AdapterSpec("default", 2, 5.0, A, B),))
    ids = torch.tensor([[0, 5], [3, 3]])
    expected = F.embedding(ids, w + 2.5 * (B @ A).T)
    torch.testing.assert_close(target.build(spec).forward(ids), expected, **TOL)


@pytest.mark.parametrize(("groups", "k"), [(1, 3), (1, 1), (3, 3)])
def test_loralib_conv2d_maps_canonical_factors_exactly(groups, k):
    target = _target("loralib")
    spec = conv2d_spec(groups=groups, k=k)
    x = torch.randn(
        1, spec.weight.shape[1] * groups, 5, 5, generator=torch.Generator().manual_seed(3), dtype=F64
    )
    h = target.build(spec)
    torch.testing.assert_close(h.forward(x), conv_expected(spec, x), **TOL)
    h.merge()
    torch.testing.assert_close(h.weights()["weight"], spec.weight + conv_delta(spec), **TOL)


def test_loralib_conv1d_with_a_kernel_cannot_hold_any_factors():
    target = _target("loralib")
    from properties.targets.loralib_target import LoralibShapeBug

    g = torch.Generator().manual_seed(4)
    conv = ConvOptions((3,), (1,), (0,), (1,), 1, "zeros")
    a = AdapterSpec("default", 1, 1.0, _rand(g, 1, 2, 3), _rand(g, 2, 1, 1))
    spec = LayerSpec("conv1d", F64, _rand(g, 2, 2, 3), (a,), conv=conv)
    with pytest.raises(LoralibShapeBug, match="view"):
        target.build(spec)


# -- torchtune ------------------------------------------------------------------------------------


def test_torchtune_dora_forward_without_bias_and_disable():
    target = _target("torchtune")
    spec = linear_spec(dora=True, bias=False)
    h = target.build(spec)
    torch.testing.assert_close(h.forward(X), linear_expected(spec, X), **TOL)
    h.set_enabled(False)
    torch.testing.assert_close(h.forward(X), X @ spec.weight.T, **TOL)
    h.set_enabled(True)
    unloaded = h.merge_and_unload()
    assert type(unloaded) is torch.nn.Linear
    torch.testing.assert_close(unloaded(X), linear_expected(spec, X), **TOL)


# -- litgpt ---------------------------------------------------------------------------------------


def test_litgpt_merge_is_idempotent_and_delta_is_scaled():
    target = _target("litgpt")
    spec = linear_spec(alpha=7.0, r=3)
    h = target.build(spec)
    torch.testing.assert_close(h.delta_weights("default")["weight"], linear_delta(spec), **TOL)
    h.merge()
    once = h.weights()["weight"]
    h.merge()
    assert torch.equal(h.weights()["weight"], once)


# -- lycoris --------------------------------------------------------------------------------------


def test_lycoris_grouped_conv_set_scale_and_disable():
    target = _target("lycoris")
    spec = conv2d_spec(groups=2, k=3, dilation=2)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5), dtype=F64)
    h = target.build(spec)
    torch.testing.assert_close(h.forward(x), conv_expected(spec, x), **TOL)
    torch.testing.assert_close(h.delta_weights("default")["weight"], conv_delta(spec), **TOL)
    h.set_scale("default", 0.0)
    base = F.conv2d(x, spec.weight, spec.base_bias, 1, 1, 2, 2)
    torch.testing.assert_close(h.forward(x), base, **TOL)
    h.set_scale("default", 1.0)
    h.set_enabled(False)
    torch.testing.assert_close(h.forward(x), base, **TOL)


def test_lycoris_merge_then_merged_forward():
    target = _target("lycoris")
    spec = linear_spec(r=3, alpha=1.5)
    h = target.build(spec)
    h.merge()
    torch.testing.assert_close(h.forward(X), linear_expected(spec, X), **TOL)
    unloaded = target.build(spec).merge_and_unload()
    assert type(unloaded) is torch.nn.Linear
    torch.testing.assert_close(unloaded(X), linear_expected(spec, X), **TOL)


@pytest.mark.xfail(
    strict=True,
    reason="lycoris 4.1.3 bug: onfly_merge caches `org_weight.data.cpu()`, which on CPU is the weight "
    "itself, so onfly_restore restores the merged weight (docs/libraries.md)",
)
def test_lycoris_onfly_restore_restores_the_base_weight_on_cpu():
    target = _target("lycoris")
    spec = linear_spec()
    h = target.build(spec)
    h.merge()
    h.unmerge()
    torch.testing.assert_close(h.weights()["weight"], spec.weight, rtol=0, atol=0)


# -- diffusers ------------------------------------------------------------------------------------


def test_diffusers_fuse_unfuse_and_disable():
    target = _target("diffusers")
    spec = linear_spec()
    h = target.build(spec)
    h.set_enabled(False)
    torch.testing.assert_close(h.forward(X), X @ spec.weight.T + spec.base_bias, **TOL)
    h.set_enabled(True)
    h.merge()
    h.unmerge()
    assert h.merged_adapters() == []
    torch.testing.assert_close(h.weights()["weight"], spec.weight, **TOL)
    torch.testing.assert_close(h.forward(X), linear_expected(spec, X), **TOL)
