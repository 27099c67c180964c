"""The facts about a model example that an xfails ``when`` line may use (see ``properties.known_bugs``)."""

from __future__ import annotations

from typing import Any

from properties.known_bugs import dora_gain
from properties.models.oracle import layer_spec
from properties.models.spec import ModelExample
from properties.models.strategies import layout
from properties.spec import dtype_name

LAYER_KEYS = ("num_hidden_layers", "n_layer", "layers_per_block", "num_layers")
HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads")


def model_features(ex: ModelExample) -> dict[str, Any]:
    """Every feature ``properties.known_bugs.FEATURES`` names: the model ones, the shared ones
    (dtype, adapters, rank, DoRA, rsLoRA, hostile) and neutral values for the layer-only ones."""
    s = ex.spec
    _, _, facts = layout(s)
    targeted = s.targeted
    modules = [m for a in s.adapters for m in a.modules.values()]
    tied = [p for p in targeted if s.twin(p) is not None]
    untargeted_twin = any(
        s.twin(p) not in a.modules for a in s.adapters for p in a.modules if s.twin(p) is not None
    )
    layers = next((s.config[k] for k in LAYER_KEYS if k in s.config), 0)
    return {
        "kind": "model",
        "dtype": dtype_name(s.dtype),
        "adapters": len(s.adapters),
        "rank": max((m.r for m in modules), default=0),
        "dora": any(a.use_dora for a in s.adapters),
        "rslora": any(a.use_rslora for a in s.adapters),
        "lora_bias": any(a.lora_bias for a in s.adapters),
        "dropout": 0.0,
        "alpha_equals_rank": any(m.alpha == m.r for m in modules),
        "base_bias": any(facts[p]["bias"] for p in targeted),
        "dora_gain": _dora_gain(ex),
        "fan_in_fan_out": any(facts[p]["fan_in_fan_out"] for p in targeted),
        "fan_in": 0,
        "fan_out": 0,
        "unbatched": False,
        "padding_idx": False,
        "heads": int(next((s.config[k] for k in HEAD_KEYS if k in s.config), 1)),
        "groups": 1,
        "kernel": 0,
        "kernel1": False,
        "stride": 0,
        "dilation": 0,
        "padding": 0,
        "padding_same": False,
        "padding_mode": "",
        "hostile": ex.hostile.kind if ex.hostile else "",
        "kernel_size": (),
        "architecture": s.architecture,
        "tied_target": bool(tied),
        "twin_untargeted": untargeted_twin,
        "embedding_target": any(facts[p]["kind"] == "embedding" for p in targeted),
        "lm_head_target": "lm_head" in targeted,
        "conv1d_target": any(facts[p]["fan_in_fan_out"] for p in targeted),
        "conv_target": any(facts[p]["kind"].startswith("conv") for p in targeted),
        "targets": len(targeted),
        "layers": int(layers),
        "masked": bool((ex.attention_mask == 0).any()),
        "modules_to_save": len(s.saved_paths),
    }


def _dora_gain(ex: ModelExample) -> float:
    """The layer feature over every module a DoRA adapter targets: each module is a layer with the
    model's exact base weight and every adapter on it (``properties.models.oracle.layer_spec``)."""
    s = ex.spec
    names = [a.name for a in s.adapters]
    paths = dict.fromkeys(p for a in s.adapters if a.use_dora for p in a.modules)
    return max((dora_gain(layer_spec(s, p, names)) for p in paths), default=0.0)
