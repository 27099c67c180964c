"""The model half on Keras: the ``keras_llama`` architecture (keras-hub ``LlamaBackbone``, torch backend)
and the ``keras`` model target. Every test skips without keras-hub; run them in the Keras env:

    python scripts/envs.py run keras -- python -m pytest -q tests/test_keras_model.py

The reference must pass every model property on the architecture (its torch view adapts the same
backbone), the Keras target must pass the properties it can run and be caught where keras-hub is wrong
(the findings), the canonical layout of Keras's per-head LoRA must be exact, and deliberately broken
variants of the target must fail.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from properties.catalogue import all_properties
from properties.profiles import PROFILES
from properties.runner import Cell, RunOptions, run_cell

PROPS = all_properties()
MODEL_PROPS = [p for p in PROPS if p.startswith("model_")]
CONFIG = dict(
    vocabulary_size=7,
    num_layers=2,
    num_query_heads=4,
    num_key_value_heads=2,
    hidden_dim=8,
    intermediate_dim=3,
)


def _needs_keras_hub() -> None:
    if importlib.util.find_spec("keras_hub") is None:
        pytest.skip("keras-hub is not installed here (python scripts/envs.py create keras)")
    os.environ.setdefault("KERAS_BACKEND", "torch")


def _run(target, prop: str, dtype: str, n: int = 2, **kw):
    opts = RunOptions(target=target.name, profile=PROFILES["ci"], seed=0, max_examples=n, **kw)
    return run_cell(target, PROPS[prop], Cell(prop, "keras_llama", dtype), opts)


# -- the architecture ---------------------------------------------------------------------------------


def test_layout_names_every_variable_in_canonical_form() -> None:
    _needs_keras_hub()
    from properties.models import keras_llama as kl

    shapes, paths, facts = kl.layout(CONFIG)
    # EinsumDense "bqm,muh->bquh": kernel (m=8, u=4, h=2) is the (u*h, m) matrix; "bquh,uhm->bqm": (m, u*h)
    assert shapes["transformer_layer_0.self_attention.query.weight"] == (8, 8)
    assert shapes["transformer_layer_1.self_attention.key.weight"] == (4, 8)
    assert shapes["transformer_layer_0.self_attention.attention_output.weight"] == (8, 8)
    assert shapes["transformer_layer_0.feedforward_gate_dense.weight"] == (
        3,
        8,
    )  # Dense (in, out) -> (out, in)
    assert shapes["token_embedding.weight"] == (7, 8) and facts["token_embedding"]["kind"] == "embedding"
    assert "transformer_layer_0.self_attention_layernorm.weight" in shapes
    assert "transformer_layer_0.self_attention_layernorm" not in paths  # norms take no LoRA
    assert kl.deep_paths(CONFIG, paths) and all(
        p.startswith("transformer_layer_1.") for p in kl.deep_paths(CONFIG, paths)
    )
    assert kl.lora_structure("transformer_layer_0.self_attention.key", CONFIG, 3, 1.5, 4)[:2] == (6, 3.0)


def test_canonical_factors_give_kerass_own_merged_kernel() -> None:
    """A canonical (A, B) (block-diagonal B with one repeated block on q/k/v) put into Keras's per-head
    ``lora_kernel_a/b`` makes exactly the kernel ``W + s·B A`` in Keras's layout, and reads back bit-exact."""
    _needs_keras_hub()
    from properties.models import keras_llama as kl
    from properties.models.targets import keras as k

    model = kl.backbone(CONFIG, torch.float64)
    model.enable_lora(2, target_layer_names=["query", "attention_output", "feedforward_output_dense"])
    layers = {kl.module_path(lyr): lyr for lyr in kl.layers(model)}
    gen = torch.Generator().manual_seed(0)
    paths = ("0.self_attention.query", "1.self_attention.attention_output", "0.feedforward_output_dense")
    for path in (f"transformer_layer_{p}" for p in paths):
        layer = layers[path]
        W = kl.to_canonical(layer, "kernel", torch.as_tensor(layer._kernel.value).detach())
        R, _, mask = kl.lora_structure(path, CONFIG, 2, 2.0, W.shape[0])
        A = torch.randn(R, W.shape[1], generator=gen, dtype=torch.float64)
        B = torch.randn(W.shape[0], R, generator=gen, dtype=torch.float64)
        B = kl.lora_fill(path, CONFIG, B if mask is None else B * mask)
        a, b = k.to_keras_factors(layer, A, B)
        layer.lora_kernel_a.assign(a)
        layer.lora_kernel_b.assign(b)
        back = k.from_keras_factors(layer, *(torch.as_tensor(v.value).detach() for v in k._lora_vars(layer)))
        A32, B32 = A.float().double(), B.float().double()  # Keras 3.15 holds LoRA factors in float32
        assert torch.equal(back[0].double(), A32) and torch.equal(back[1].double(), B32)
        merged = kl.to_canonical(layer, "kernel", torch.as_tensor(layer.kernel).detach().double())
        torch.testing.assert_close(merged, W + B32 @ A32, rtol=1e-6, atol=1e-6)  # alpha = rank: scaling 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("prop", MODEL_PROPS)
def test_reference_passes_model_properties_on_keras_llama(prop: str, dtype: str) -> None:
    _needs_keras_hub()
    from properties.models.targets.reference import TARGET

    result = _run(TARGET, prop, dtype)
    expected = "skipped" if prop == "model_tied_weights" else "passed"  # keras_llama is untied
    assert result.status == expected, f"{prop} keras_llama {dtype}: {result.message}\n{result.example}"


# -- the Keras target -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "prop", ["model_merge_equivalence", "model_merged_save_load", "model_unloaded_is_plain"]
)
def test_keras_model_target_passes(prop: str, dtype: str) -> None:
    _needs_keras_hub()
    from properties.models.targets.keras import TARGET

    result = _run(TARGET, prop, dtype, n=3)
    assert result.status == "passed", f"{prop} {dtype}: {result.message}\n{result.example}"


def test_partial_adapter_load_is_caught() -> None:
    """keras-hub-lora-load-partial, through the suite (run_cell applies no xfails): a 2-block adapter
    loads silently into a 1-block backbone."""
    _needs_keras_hub()
    from properties.models.targets.keras import TARGET

    result = _run(TARGET, "model_adapter_save_load", "float32", n=4)
    assert result.status in ("failed", "error"), result.message
    assert "nothing reported" in result.message or "lora_kernel_a" in result.message, result.message


def test_keras_declares_what_it_lacks() -> None:
    _needs_keras_hub()
    from properties.models.targets.keras import TARGET

    caps = TARGET.capabilities()
    assert caps.layers == {"keras_llama"} and caps.uniform_rank and caps.alpha_is_rank
    assert {"merge", "unmerge", "unload", "safe_merge"}.isdisjoint(caps.operations)
    for prop in (
        "model_unload_restores_base",
        "model_safe_merge",
        "model_merge_unmerge",
        "model_adapter_isolation",
    ):
        assert _run(TARGET, prop, "float32").status == "skipped", prop
    assert "keras-hub" in caps.notes["llama"]


def test_same_name_closure_covers_every_block() -> None:
    _needs_keras_hub()
    from properties.models.targets.keras import same_name_paths

    out = same_name_paths("keras_llama", ["transformer_layer_1.self_attention.query", "token_embedding"])
    assert {"transformer_layer_0.self_attention.query", "transformer_layer_2.self_attention.query"} <= set(
        out
    )
    assert "token_embedding" in out and "transformer_layer_0.self_attention.value" not in out


# -- broken Keras targets are caught ----------------------------------------------------------------------


def _broken(handle_cls):
    from properties.models.targets import keras as k

    class Broken(k.KerasModelTarget):
        def build(self, spec):
            h = super().build(spec)
            broken = handle_cls.__new__(handle_cls)
            broken.__dict__.update(h.__dict__)
            return broken

    return Broken()


def test_merge_that_forgets_the_lora_is_caught() -> None:
    """merge_and_unload that reloads the base model (the LoRA never merged): merge equivalence fails."""
    _needs_keras_hub()
    from properties.models.targets import keras as k

    class Forgets(k.KerasModelHandle):
        def merge_and_unload(self, *, safe: bool = False) -> None:
            self.backbone, self.settings = k.TARGET._backbone(self.spec), None

    result = _run(_broken(Forgets), "model_merge_equivalence", "float32", n=4)
    assert result.status == "failed" and "merged" in result.message, result.message


def test_reload_in_the_default_dtype_is_caught() -> None:
    """The merged preset reloaded without ``dtype=`` (keras-hub then loads float32): a bfloat16 merged
    model comes back in float32, and the reload property sees it."""
    _needs_keras_hub()
    from properties.models import keras_llama as kl
    from properties.models.targets import keras as k

    class DefaultDtype(k.KerasModelTarget):
        def load_merged(self, spec, directory):
            with kl.rng_kept():
                model = kl.keras_hub().models.LlamaBackbone.from_preset(str(directory))
            return k.KerasModelHandle(model, spec, None)

    result = _run(DefaultDtype(), "model_merged_save_load", "bfloat16", n=2)
    assert result.status == "failed" and "bit-identical" in result.message, result.message
