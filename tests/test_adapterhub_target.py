"""The adapter-hub ``adapters`` model target: what it can express is what is drawn, and its cells run.

The pure parts (which modules one ``LoRAConfig`` selects) run anywhere. The cells need ``adapters``,
which pins its own transformers: ``python scripts/envs.py run adapters -- python -m pytest
tests/test_adapterhub_target.py``; elsewhere they skip.
"""

from __future__ import annotations

import dataclasses

import pytest

from properties.catalogue import all_properties
from properties.models.targets import adapterhub
from properties.profiles import PROFILES
from properties.runner import Cell, RunOptions, run_cell

PROPS = all_properties()


def test_closure_is_every_kind_chosen_in_every_layer_chosen() -> None:
    chosen = ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"]
    assert adapterhub.closure("llama", chosen) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.2.self_attn.q_proj",
        "model.layers.2.mlp.down_proj",
    ]


def test_targetable_leaves_out_what_adapters_cannot_adapt() -> None:
    paths = (
        "model.embed_tokens",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "lm_head",
    )
    assert adapterhub.targetable("llama", paths) == (
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.up_proj",
    )
    gpt2 = ("transformer.wte", "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc")
    assert adapterhub.targetable("gpt2", gpt2) == ("transformer.h.0.mlp.c_fc",)
    bert = ("encoder.layer.1.attention.output.dense", "encoder.layer.1.output.dense")
    assert adapterhub.targetable("bert", bert) == ("encoder.layer.1.output.dense",)


def _usable() -> None:
    why = adapterhub.TARGET.capabilities().notes.get("llama")
    if why:
        pytest.skip(why)


class _WithoutDora:
    """The adapters target with DoRA left out of what is drawn (its DoRA is a finding: adapters-dora)."""

    name = "adapters"
    is_model_target = True

    def __getattr__(self, attr):
        return getattr(adapterhub.TARGET, attr)

    def capabilities(self):
        caps = adapterhub.TARGET.capabilities()
        return dataclasses.replace(caps, options=caps.options - {"dora"})


def _run(target, prop: str, arch: str, dtype: str = "float32", n: int = 4):
    opts = RunOptions(target="adapters", profile=PROFILES["ci"], seed=0, max_examples=n)
    return run_cell(target, PROPS[prop], Cell(prop, arch, dtype), opts)


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_merge_unmerge_passes_without_dora(arch: str) -> None:
    _usable()
    result = _run(_WithoutDora(), "model_merge_unmerge", arch)
    assert result.status == "passed", f"{result.message}\n{result.example}"
    assert result.examples >= 1


def test_adapter_save_load_round_trips_on_bert() -> None:
    _usable()
    result = _run(adapterhub.TARGET, "model_adapter_save_load", "bert")
    assert result.status == "passed", f"{result.message}\n{result.example}"


def test_dora_is_caught() -> None:
    """adapters' DoRA forward is not DoRA's (findings/libraries.md#adapters-dora): the property fails."""
    _usable()
    result = _run(adapterhub.TARGET, "model_merge_unmerge", "bert", n=12)
    assert result.status == "failed" and "dora=True" in result.example, result.message


def test_operations_it_lacks_are_skipped_with_the_reason() -> None:
    _usable()
    result = _run(adapterhub.TARGET, "model_merge_equivalence", "llama")
    assert result.status == "skipped" and "merge_and_unload" in result.message
    result = _run(adapterhub.TARGET, "model_tied_weights", "llama_tied")
    assert result.status == "skipped" and "tied_target" in result.message
