"""Every misuse gets a ValueError/TypeError that names the offending value, and changes nothing."""

import pytest
import torch
from torch import nn

import lora_core
from lora_core import LoraConfig


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(r=0), ValueError, "r must be a positive integer, got 0"),
        (dict(r=-3), ValueError, "got -3"),
        (dict(r=2.5), TypeError, "got 2.5"),
        (dict(r=True), TypeError, "got True"),
        (dict(lora_alpha=float("nan")), ValueError, "lora_alpha must be a finite number, got nan"),
        (dict(lora_alpha=float("inf")), ValueError, "got inf"),
        (dict(lora_dropout=1.0), ValueError, r"lora_dropout must be in \[0, 1\), got 1.0"),
        (dict(lora_dropout=-0.1), ValueError, "got -0.1"),
        (dict(use_dora=True, lora_bias=True), ValueError, "use_dora=True with lora_bias=True"),
        (dict(use_rslora=1), TypeError, "use_rslora must be a bool, got 1"),
    ],
)
def test_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(**kwargs)


@pytest.fixture
def layer():
    layer = lora_core.wrap(nn.Linear(4, 3, bias=False))
    layer.add_adapter("a", LoraConfig(r=2))
    return layer


def test_unknown_adapter_names(layer):
    calls = [
        lambda: layer.merge(adapter_names=["zz"]),
        lambda: layer.set_adapter("zz"),
        lambda: layer.set_adapter(["a", "zz"]),
        lambda: layer(torch.randn(2, 4), adapter_names=["a", "zz"]),
        lambda: layer.set_scale("zz", 2.0),
        lambda: layer.delete_adapter("zz"),
        lambda: layer.load_factors("zz", A=torch.zeros(2, 4)),
        lambda: layer.get_delta_weight("zz"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"unknown adapter 'zz'; known adapters: \['a'\]"):
            call()
    assert layer.active_adapters == ["a"] and not layer.merged


def test_adapter_creation_errors(layer):
    with pytest.raises(ValueError, match="adapter 'a' already exists"):
        layer.add_adapter("a", LoraConfig(r=2))
    with pytest.raises(ValueError, match="lora_bias=True needs a base layer with a bias"):
        layer.add_adapter("b", LoraConfig(r=2, lora_bias=True))
    for bad in ("", "x.y", "__base__", 3):
        with pytest.raises(ValueError, match="adapter name must be"):
            layer.add_adapter(bad, LoraConfig(r=2))
    with pytest.raises(TypeError, match="config must be a LoraConfig, got dict"):
        layer.add_adapter("b", {"r": 2})
    assert list(layer.r) == ["a"] and list(layer.lora_A) == ["a"]


def test_mixed_batch_errors(layer):
    with pytest.raises(ValueError, match="adapter_names has 1 entries but the batch has 2 rows"):
        layer(torch.randn(2, 4), adapter_names=["a"])
    layer.merge()
    with pytest.raises(ValueError, match=r"mixed-batch forward is not possible while merged \(\['a'\]\)"):
        layer(torch.randn(2, 4), adapter_names=["a", "__base__"])


def test_merged_adapter_cannot_be_deleted_or_reloaded(layer):
    layer.merge()
    with pytest.raises(ValueError, match="'a' is merged; unmerge first before deleting"):
        layer.delete_adapter("a")
    with pytest.raises(ValueError, match="'a' is merged; unmerge first before loading"):
        layer.load_factors("a", A=torch.zeros(2, 4))


def test_load_factors_validates_before_copying(layer):
    before = layer.lora_A["a"].detach().clone()
    with pytest.raises(ValueError, match=r"B for adapter 'a': expected shape \(3, 2\), got \(2, 3\)"):
        layer.load_factors("a", A=torch.ones(2, 4), B=torch.ones(2, 3))
    assert torch.equal(layer.lora_A["a"], before)
    with pytest.raises(ValueError, match="adapter 'a' of Linear has no 'magnitude' factor"):
        layer.load_factors("a", magnitude=torch.ones(3))


def test_conv_groups_must_divide_r():
    layer = lora_core.wrap(nn.Conv2d(4, 6, 3, groups=2))
    with pytest.raises(ValueError, match="r=3 must be divisible by the base conv's groups=2"):
        layer.add_adapter("a", LoraConfig(r=3))
    assert not layer.lora_A


def test_unsupported_module_type():
    with pytest.raises(TypeError, match="unsupported base module type ReLU; supported: Linear, Embedding"):
        lora_core.wrap(nn.ReLU())
    with pytest.raises(TypeError, match="Linear is already a LoRA layer"):
        lora_core.wrap(lora_core.wrap(nn.Linear(2, 2)))


def test_embedding_max_norm_rejected():
    with pytest.raises(ValueError, match="max_norm=1.0 .*renormalises weight rows in place at lookup"):
        lora_core.wrap(nn.Embedding(4, 2, max_norm=1.0))


def test_mha_restrictions():
    with pytest.raises(ValueError, match="dropout=0.1 is not supported"):
        lora_core.wrap(nn.MultiheadAttention(4, 2, dropout=0.1))
    with pytest.raises(ValueError, match="kdim/vdim"):
        lora_core.wrap(nn.MultiheadAttention(4, 2, kdim=3))
    with pytest.raises(ValueError, match="add_bias_kv or add_zero_attn"):
        lora_core.wrap(nn.MultiheadAttention(4, 2, add_zero_attn=True))
    layer = lora_core.wrap(nn.MultiheadAttention(4, 2))
    with pytest.raises(ValueError, match="use_dora=True is not supported for MultiheadAttention"):
        layer.add_adapter("a", LoraConfig(r=2, use_dora=True))
    with pytest.raises(ValueError, match="lora_bias=True is not supported for MultiheadAttention"):
        layer.add_adapter("a", LoraConfig(r=2, lora_bias=True))


def test_scaling_errors(layer):
    with pytest.raises(ValueError, match="factor must be non-zero, got 0"):
        layer.unscale_layer(0)
    assert layer.scaling["a"] == 8.0 / 2
