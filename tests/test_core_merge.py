"""Merge, unmerge, safe_merge, exact_unmerge, dtype handling and the other state rules."""

import copy

import pytest
import torch
from torch import nn

import lora_core
from lora_core import LoraConfig

TIGHT = dict(rtol=1e-12, atol=1e-12)


def make(base, *names, dtype=torch.float64, exact_unmerge=False, **config):
    torch.manual_seed(0)
    layer = lora_core.wrap(base.to(dtype), exact_unmerge=exact_unmerge)
    for name in names:
        layer.add_adapter(name, LoraConfig(init_lora_weights=False, **{"r": 2, **config}))
    return layer.eval()


def bits(layer):
    """Every piece of state a failed merge must leave alone, as exact bit patterns."""
    tensors = {n: p.detach().clone() for n, p in layer.named_parameters()}
    return tensors, list(layer.merged_adapters), {k: v.clone() for k, v in layer._caches.items()}


def assert_same_bits(before, after):
    assert before[1] == after[1] and before[2].keys() == after[2].keys()
    for old, new in ((before[0], after[0]), (before[2], after[2])):
        assert old.keys() == new.keys()
        for key in old:
            assert old[key].dtype == new[key].dtype
            assert torch.equal(old[key].view(torch.uint8), new[key].view(torch.uint8)), key


def test_merge_rounds_once_and_keeps_dtype_and_device():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        layer = make(nn.Linear(6, 4), "a", "b", dtype=dtype, lora_bias=True)
        w, b = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
        layer.merge(adapter_names=["a"])
        delta = layer.scaling["a"] * layer.lora_B["a"].float() @ layer.lora_A["a"].float()
        assert torch.equal(layer.base_layer.weight, (w.float() + delta).to(dtype))
        assert torch.equal(
            layer.base_layer.bias, (b.float() + layer.scaling["a"] * layer.lora_bias["a"].float()).to(dtype)
        )
        for p in (layer.base_layer.weight, layer.lora_A["a"], layer.lora_B["a"], layer.lora_bias["a"]):
            assert p.dtype == dtype and p.device == w.device
        assert layer.merged_adapters == ["a"] and layer.merged


def test_subtractive_round_trip_small_in_float32():
    layer = make(nn.Conv2d(4, 6, 3, groups=2), "a", "b", dtype=torch.float32, use_dora=True)
    w = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert not torch.allclose(layer.base_layer.weight, w)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w, rtol=1e-5, atol=1e-6)
    assert layer.merged_adapters == [] and layer._caches == {}


def test_unmerge_is_last_in_first_out():
    """Two DoRA adapters merged one after the other only come back out in reverse order."""
    layer = make(nn.Linear(5, 4), "a", "b", use_dora=True)
    layer.load_factors("b", magnitude=torch.rand(4, dtype=torch.float64) + 2)
    w = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 5, dtype=torch.float64)
    layer.merge(adapter_names=["a"])
    only_a = layer.base_layer.weight.detach().clone()
    expected = layer(x)
    layer.merge(adapter_names=["b"])
    assert layer.merged_adapters == ["a", "b"]
    torch.testing.assert_close(layer(x), expected, **TIGHT)  # DoRA norm of b taken on the merged weight
    assert not torch.allclose(layer.base_layer.weight, only_a)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), w, **TIGHT)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_exact_unmerge_is_bit_identical(dtype):
    for base in (nn.Linear(8, 8), nn.Embedding(6, 4), nn.MultiheadAttention(4, 2)):
        lora_bias = isinstance(base, nn.Linear)
        use_dora = isinstance(base, nn.Embedding)
        layer = make(base, "a", "b", dtype=dtype, exact_unmerge=True, lora_bias=lora_bias, use_dora=use_dora)
        before = bits(layer)
        layer.merge(adapter_names=["a"])
        layer.merge(adapter_names=["b"])
        layer.unmerge()
        assert_same_bits(before, bits(layer))
        assert layer._originals is None


def test_failed_safe_merge_changes_nothing_fp16_overflow():
    layer = make(nn.Linear(4, 3), "a", "b", dtype=torch.float16)
    with torch.no_grad():
        layer.base_layer.weight.fill_(65000.0)
    layer.load_factors("b", A=torch.ones(2, 4), B=torch.full((3, 2), 100.0))
    layer.set_scale("b", 1.0)
    before = bits(layer)
    with pytest.raises(ValueError, match=r"adapter 'b'.*'weight'.*\+Inf from overflow when rounding"):
        layer.merge(safe_merge=True)
    assert_same_bits(before, bits(layer))
    layer.merge()  # unsafe merge writes what it computes
    assert torch.isinf(layer.base_layer.weight).all()


@pytest.mark.parametrize(
    "value,kind",
    [(float("nan"), "NaN"), (float("inf"), r"\+Inf"), (float("-inf"), "-Inf")],
)
def test_failed_safe_merge_changes_nothing_nan_inf(value, kind):
    layer = make(nn.Linear(4, 3), "a", "b", use_dora=False, lora_bias=True)
    layer.merge(adapter_names=["a"])
    b = torch.ones(3, 2, dtype=torch.float64)
    b[1, 0] = value
    layer.load_factors("b", A=torch.rand(2, 4, dtype=torch.float64) + 0.1, B=b)
    before = bits(layer)
    with pytest.raises(ValueError, match=f"adapter 'b'.*'weight'.*{kind}"):
        layer.merge(safe_merge=True, adapter_names=["b"])
    assert_same_bits(before, bits(layer))


def test_safe_merge_checks_bias_and_later_adapters_atomically():
    layer = make(nn.Linear(4, 3), "a", "b", dtype=torch.bfloat16, lora_bias=True, exact_unmerge=True)
    layer.load_factors("b", bias=torch.tensor([0.0, float("nan"), 0.0]))
    before = bits(layer)
    with pytest.raises(ValueError, match="adapter 'b'.*'bias'.*NaN"):
        layer.merge(safe_merge=True, adapter_names=["a", "b"])
    assert_same_bits(before, bits(layer))
    assert layer._originals is None
    layer.merge(safe_merge=True, adapter_names=["a"])
    assert layer.merged_adapters == ["a"]


def test_safe_merge_equals_unsafe_merge():
    base = nn.Conv1d(2, 4, 3)
    one, two = (make(copy.deepcopy(base), "a", "b", dtype=torch.bfloat16, use_dora=True) for _ in range(2))
    one.merge(safe_merge=True)
    two.merge()
    assert torch.equal(one.base_layer.weight, two.base_layer.weight)


def test_merging_twice_and_unmerging_nothing_warn_and_do_nothing():
    layer = make(nn.Linear(4, 3), "a")
    with pytest.warns(UserWarning, match="nothing is merged"):
        layer.unmerge()
    layer.merge()
    once = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="'a' is already merged"):
        layer.merge()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge(adapter_names=["a"])
    assert torch.equal(layer.base_layer.weight, once) and layer.merged_adapters == ["a"]


def test_disabled_adapters_give_exactly_the_base_output():
    layer = make(nn.Conv2d(2, 3, 3), "a", lora_bias=True)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    reference = copy.deepcopy(layer.base_layer)
    layer.enable_adapters(False)
    assert layer.disable_adapters
    assert torch.equal(layer(x), reference(x))
    layer.enable_adapters(True)
    layer.merge()
    layer.enable_adapters(False)
    with pytest.warns(UserWarning, match="unmerging first"):
        out = layer(x)
    assert not layer.merged
    torch.testing.assert_close(out, reference(x), **TIGHT)


def test_active_set_selects_adapters():
    layer = make(nn.Linear(4, 3), "a", "b")
    x = torch.randn(2, 4, dtype=torch.float64)
    assert layer.active_adapters == ["a", "b"]
    layer.set_adapter("b")
    only_b = layer.base_layer(x) + layer.scaling["b"] * x @ (layer.lora_B["b"] @ layer.lora_A["b"]).T
    torch.testing.assert_close(layer(x), only_b, **TIGHT)
    layer.merge()
    assert layer.merged_adapters == ["b"]
    layer.unmerge()
    layer.set_adapter(["a", "b"])
    layer.delete_adapter("a")
    assert layer.active_adapters == ["b"] and "a" not in layer.lora_A and "a" not in layer.scaling


def test_scaling_controls():
    layer = make(nn.Linear(4, 3), "a", "b", r=4, lora_alpha=8.0)
    layer.add_adapter("c", LoraConfig(r=4, lora_alpha=8.0, use_rslora=True, init_lora_weights=False))
    x = torch.randn(2, 4, dtype=torch.float64)
    before = layer(x)
    layer.set_scale("a", 1.0)
    assert torch.equal(layer(x), before)
    layer.set_scale("a", 3.0)
    assert layer.scaling["a"] == 6.0
    layer.scale_layer(0.5)
    assert layer.scaling == {"a": 3.0, "b": 1.0, "c": 2.0}
    layer.unscale_layer(0.5)
    assert layer.scaling == {"a": 6.0, "b": 2.0, "c": 4.0}
    layer.unscale_layer()
    assert layer.scaling == {"a": 2.0, "b": 2.0, "c": 4.0}  # rsLoRA: 8 / sqrt(4)
    assert torch.equal(layer(x), before)
    layer.merge(adapter_names=["a"])
    for change in (lambda: layer.set_scale("a", 2.0), lambda: layer.scale_layer(2.0), layer.unscale_layer):
        with pytest.raises(ValueError, match="'a' is merged; unmerge first"):
            change()
    assert layer.scaling["a"] == 2.0


def test_merge_and_unload_returns_the_plain_merged_base():
    base = nn.Linear(4, 3)
    layer = make(base, "a", "b", lora_bias=True, exact_unmerge=True)
    layer.set_adapter("a")
    expected = {k: base.state_dict()[k] + v for k, v in layer.get_delta_weights("a").items()}
    out = layer.merge_and_unload()
    assert out is base and type(out) is nn.Linear
    for key, value in expected.items():
        torch.testing.assert_close(out.state_dict()[key], value, **TIGHT)
    assert layer._originals is None


def test_dora_delta_is_what_merge_adds_and_init_norm_cache_key():
    layer = make(nn.Embedding(5, 3), "a", use_dora=True)
    w = layer.base_layer.weight.detach().clone()
    delta = layer.get_delta_weight("a")
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), w + delta, **TIGHT)
    assert layer._caches["a-weight_norm"].shape == (3,)
