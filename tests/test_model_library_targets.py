"""The model half on the library architectures and targets: diffusers (``unet``), torchtune
(``torchtune_llama``) and litgpt (``litgpt``). Each test skips where its library is missing; run them
in the library's env:

    python scripts/envs.py run diffusers -- python -m pytest tests/test_model_library_targets.py
    python scripts/envs.py run torchtune -- python -m pytest tests/test_model_library_targets.py
    python scripts/envs.py run litgpt -- python -m pytest tests/test_model_library_targets.py

The reference must pass every model property on the new architectures (no false alarm from the conv
bound or the grouped targets), each library target must run its cells, and a deliberately broken
variant of each target must fail, so the properties are shown to assert something through it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from properties.catalogue import all_properties
from properties.models import torchtune_llama as tt
from properties.models.strategies import ModelDraw, _layout, _targets
from properties.profiles import PROFILES
from properties.runner import Cell, RunOptions, run_cell
from properties.targets.protocol import Unsupported

PROPS = all_properties()
MODEL_PROPS = [p for p in PROPS if p.startswith("model_")]


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed here (python scripts/envs.py create {module})")


def _run(target, prop: str, arch: str, dtype: str, n: int = 2, **kw):
    opts = RunOptions(target=target.name, profile=PROFILES["ci"], seed=0, max_examples=n, **kw)
    return run_cell(target, PROPS[prop], Cell(prop, arch, dtype), opts)


# -- pure parts (no library needed) ------------------------------------------------------------------


def test_torchtune_groups_follow_lora_llama3_switches() -> None:
    """torchtune puts LoRA on kinds of modules: each attention projection, the MLP, the output head."""
    assert tt.group_of("layers.2.attn.q_proj") == "q_proj"
    assert tt.group_of("layers.0.mlp.w3") == "mlp"
    assert tt.group_of("output") == "output"
    assert tt.group_of("tok_embeddings") is None  # no LoRA on the embedding in torchtune
    paths = ("tok_embeddings", "layers.0.attn.k_proj", "layers.0.mlp.w1", "layers.1.attn.k_proj", "output")
    assert tt.deep_paths({"num_layers": 2}, paths) == ["layers.1.attn.k_proj"]


def test_grouped_architecture_rule_is_stated_as_model_capabilities() -> None:
    """torchtune's rule reaches the strategies as ``ModelCapabilities`` fields, as a target's would."""
    from properties.models import architectures as archs
    from properties.models.protocol import ModelCapabilities, full_model_capabilities

    caps = archs.drawable(full_model_capabilities(), "torchtune_llama")
    assert isinstance(caps, ModelCapabilities) and caps.uniform_rank
    assert caps.group_of("torchtune_llama", "layers.1.mlp.w2") == "mlp"
    assert caps.group_of("torchtune_llama", "tok_embeddings") is None
    assert archs.drawable(full_model_capabilities(), "llama") == full_model_capabilities()


def test_grouped_targets_take_whole_groups_and_the_deep_one() -> None:
    """Whatever is drawn, every group is taken whole or not at all, a forced path brings its group, and
    a module no switch adapts is never drawn: one draw decides one group."""
    from hypothesis import given
    from hypothesis import strategies as st

    paths = ("l0.q", "l0.w1", "l1.q", "l1.w1", "output")
    groups = {"l0.q": "q", "l1.q": "q", "l0.w1": "mlp", "l1.w1": "mlp", "output": "output"}
    d = ModelDraw("x", torch.float32, frozenset(), group_of=lambda _a, p: groups[p])

    @given(st.data())
    def check(data) -> None:
        labels: list[str] = []

        def draw(strategy, label=None):
            labels.append(label)
            return data.draw(strategy)

        chosen = _targets(draw, d, "x", ["l1.w1"], ["l0.q", "l1.q", "output"], paths)
        assert {"l0.w1", "l1.w1"} <= set(chosen)
        for g in set(groups.values()):
            members = {p for p in paths if groups[p] == g}
            assert members <= set(chosen) or not members & set(chosen)
        assert labels == ["target l0.q", "target output"]  # l1.q is decided by l0.q's draw

    check()


# -- every library architecture: the reference passes, each library target runs or says why ----------

# (architecture, the library it needs, a dtype): the reference's cells on each library architecture.
REFERENCE_CELLS = [
    *(("unet", "diffusers", d) for d in ("float32", "bfloat16")),
    *(("torchtune_llama", "torchtune", d) for d in ("float32", "bfloat16")),
    *(("litgpt", "litgpt", d) for d in ("float32", "float16")),
]


@pytest.mark.parametrize("prop", MODEL_PROPS)
@pytest.mark.parametrize(("arch", "library", "dtype"), REFERENCE_CELLS)
def test_reference_passes_model_properties_on_library_architectures(
    arch: str, library: str, dtype: str, prop: str
) -> None:
    """No false alarm from the conv bound, the grouped targets or litgpt's fused qkv LoRA."""
    _needs(library)
    from properties.models.targets.reference import TARGET

    result = _run(TARGET, prop, arch, dtype)
    expected = "skipped" if prop == "model_tied_weights" else "passed"  # none of them ties weights
    assert result.status == expected, f"{prop} {arch} {dtype}: {result.message}\n{result.example}"


# What torchtune and litgpt lack at model level: no unload, no in-place unmerge (their merges are
# checkpoint exports), one adapter, no safe merge, no tied weights.
CHECKPOINT_MERGE_LACKS = {
    "model_unload_restores_base",
    "model_merge_unmerge",
    "model_adapter_isolation",
    "model_safe_merge",
    "model_tied_weights",
}


@pytest.mark.parametrize("prop", MODEL_PROPS)
@pytest.mark.parametrize(("library", "arch"), [("torchtune", "torchtune_llama"), ("litgpt", "litgpt")])
def test_checkpoint_merge_model_targets_run_or_say_why(library: str, arch: str, prop: str) -> None:
    _needs(library)
    import importlib

    target = importlib.import_module(f"properties.models.targets.{library}").TARGET
    result = _run(target, prop, arch, "float32")
    if prop in CHECKPOINT_MERGE_LACKS:
        assert result.status == "skipped" and result.message, result.message
    else:
        assert result.status == "passed", f"{prop}: {result.message}\n{result.example}"
        if prop == "model_merge_equivalence":
            assert result.max_ratio > 0  # the merged modules were compared, not skipped


# -- diffusers: the unet architecture -----------------------------------------------------------------


def test_unet_layout_has_conv_modules_with_their_geometry() -> None:
    _needs("diffusers")
    from properties.models import unet

    config = dict(
        sample_size=4, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(2,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        mid_block_type=None, norm_num_groups=1, cross_attention_dim=1, attention_head_dim=1,
    )  # fmt: skip
    _, paths, facts = _layout("unet", tuple(sorted(config.items())))
    assert facts["conv_in"]["kind"] == "conv2d" and facts["conv_in"]["conv"].kernel_size == (3, 3)
    assert facts["conv_in"]["conv"].padding == (1, 1)
    assert facts["down_blocks.0.attentions.0.proj_in"]["conv"].kernel_size == (1, 1)
    assert facts["time_embedding.linear_1"]["kind"] == "linear"
    deep = unet.deep_paths(config, paths)
    assert deep and all(
        p.startswith(("down_blocks.0.resnets.1.", "down_blocks.0.attentions.1.")) for p in deep
    )
    _, small, _ = _layout("unet", tuple(sorted(unet.fewer_layers(config).items())))
    assert not set(deep) & set(small)  # an adapter on a deep path does not fit the smaller UNet


@pytest.mark.parametrize(
    "prop",
    [p for p in MODEL_PROPS if p not in ("model_tied_weights", "model_safe_merge")],
)
def test_diffusers_model_target_passes_on_unet(prop: str) -> None:
    _needs("diffusers")
    from properties.models.targets.diffusers import TARGET

    result = _run(TARGET, prop, "unet", "float32")
    assert result.status == "passed", f"{prop}: {result.message}\n{result.example}"


def test_diffusers_safe_fuse_is_not_atomic_for_the_model() -> None:
    """The finding, through the suite: a refused fuse_lora(safe_fusing=True) changes the model."""
    _needs("diffusers")
    from properties.models.targets.diffusers import TARGET

    result = _run(TARGET, "model_safe_merge", "unet", "float32", n=10)
    assert result.status == "failed" and "safe merge raised but the model changed" in result.message


def test_diffusers_declares_what_it_lacks() -> None:
    _needs("diffusers")
    from properties.models.targets.diffusers import TARGET

    caps = TARGET.capabilities()
    assert caps.layers == {"unet"} and "weighted_cat" not in caps.operations
    assert "PeftAdapterMixin" in caps.notes["llama"]
    assert _run(TARGET, "model_merge_equivalence", "gpt2", "float32").status == "skipped"


def test_broken_diffusers_fuse_is_caught() -> None:
    """fuse_lora at the wrong scale (lora_scale=2): model_merge_equivalence fails through diffusers."""
    _needs("diffusers")
    from properties.models.targets import diffusers as d

    class DoubleScale(d.DiffusersModelHandle):
        def merge_and_unload(self, *, safe: bool = False) -> None:
            self.root.fuse_lora(lora_scale=2.0, safe_fusing=safe)
            self.root.unload_lora()

    class Target(d.DiffusersModelTarget):
        def build_base(self, spec):
            return DoubleScale(super().build_base(spec).root)

    result = _run(Target(), "model_merge_equivalence", "unet", "float32", n=10)
    assert result.status == "failed", result.message


# -- torchtune: the torchtune_llama architecture ------------------------------------------------------


def test_broken_torchtune_merge_is_caught() -> None:
    """get_merged_lora_ckpt called with the wrong alpha: model_merge_equivalence fails."""
    _needs("torchtune")
    from properties.models.targets import torchtune as t

    class WrongAlpha(t.TorchtuneModelTarget):
        def build(self, spec):
            h = super().build(spec)
            h.settings = {**h.settings, "alpha": 2 * h.settings["alpha"]}
            return h

    result = _run(WrongAlpha(), "model_merge_equivalence", "torchtune_llama", "float32", n=10)
    assert result.status == "failed", result.message


def test_torchtune_refuses_an_adapter_for_a_missing_layer(tmp_path) -> None:
    """validate_missing_and_unexpected_for_lora refuses keys for a layer the model does not have."""
    _needs("torchtune")
    from hypothesis import given, settings

    from properties.models.checks import _fewer_layers
    from properties.models.strategies import model_draw, model_examples
    from properties.models.targets.torchtune import TARGET

    draw = model_draw(TARGET.capabilities(), "torchtune_llama", torch.float32, frozenset(), deep_target=True)

    @settings(max_examples=3, deadline=None, database=None)
    @given(model_examples(draw))
    def check(ex) -> None:
        try:
            h = TARGET.build(ex.spec)
        except Unsupported:
            return  # an example torchtune cannot express (no attention projection targeted)
        d = tmp_path / f"a{ex.spec.seed}"
        h.save_adapter(d, "default")
        with pytest.raises(ValueError, match="refused"):
            TARGET.load_adapter(_fewer_layers(ex.spec), d, "default")

    check()


# -- litgpt: the litgpt architecture ------------------------------------------------------------------


def test_litgpt_groups_follow_its_lora_switches() -> None:
    from properties.models import litgpt_gpt as lg

    assert lg.group_of("lm_head") == "head"
    assert lg.group_of("transformer.h.0.attn.proj") == "projection"
    assert lg.group_of("transformer.h.1.mlp.proj") == "mlp"
    assert lg.group_of("transformer.h.0.mlp.fc_1") == "mlp"
    assert lg.group_of("transformer.h.0.attn.qkv") == "qkv"
    assert lg.group_of("transformer.wte") is None  # no LoRA on the embedding in litgpt


def test_litgpt_fused_qkv_lora_is_block_diagonal_in_canonical_form() -> None:
    """q and v enabled (GQA: q 4 rows, k and v 2 each), r=2: a rank-4 canonical LoRA, alpha doubled,
    whose B holds each block's factor in its own rows and columns; litgpt's stored lora_B round-trips."""
    from properties.models import litgpt_gpt as lg
    from properties.models.targets.litgpt import _qkv_canonical, _qkv_stored

    config = {"n_head": 2, "n_query_groups": 1, "head_size": 2, "lora_qkv": (True, False, True)}
    assert lg.qkv_blocks(config) == [(0, 4), (6, 8)]
    r, alpha, mask = lg.lora_structure("transformer.h.0.attn.qkv", config, 2, 1.5, 8)
    assert (r, alpha) == (4, 3.0) and mask.shape == (8, 4)
    assert mask[:4, :2].all() and mask[6:, 2:].all() and mask.sum() == 4 * 2 + 2 * 2
    B = torch.randn(8, 4, dtype=torch.float64) * mask
    stored = _qkv_stored(config, B, 2)
    assert stored.shape == (6, 2)  # litgpt's lora_B: the enabled rows, r columns
    assert torch.equal(_qkv_canonical(config, stored, 2, 8), B)
    assert lg.lora_structure("transformer.h.0.attn.proj", config, 2, 1.5, 8) == (2, 1.5, None)


def test_broken_litgpt_export_is_caught() -> None:
    """An export that keeps the unmerged base weights (merge skipped): model_merge_equivalence fails."""
    _needs("litgpt")
    from properties.models.targets import litgpt as t

    class NoMerge(t.LitgptModelHandle):
        def merge(self, *, adapter_names=None, safe=False) -> None:
            pass

    class Target(t.LitgptModelTarget):
        def build(self, spec):
            h = super().build(spec)
            return NoMerge(h.root, h.spec, h.settings)

    result = _run(Target(), "model_merge_equivalence", "litgpt", "float32", n=10)
    assert result.status == "failed", result.message
