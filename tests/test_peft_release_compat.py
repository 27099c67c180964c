"""The PEFT model target on releases that lack an API (0.7-0.15): capabilities detected by feature, and
no keyword sent that the release does not take, so those cells are skipped with a reason, not errors."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("peft")

from properties.models.spec import ModelAdapter  # noqa: E402
from properties.models.targets import peft as peft_model  # noqa: E402
from properties.spec import AdapterSpec  # noqa: E402
from properties.targets.protocol import Unsupported  # noqa: E402


def _old_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in PEFT 0.7 for the target: a LoraConfig without use_rslora / use_dora."""

    def lora_config(
        target_modules=None, r=8, lora_alpha=8, rank_pattern=None, alpha_pattern=None, init_lora_weights=True
    ):
        return {"target_modules": target_modules, "r": r}

    fake = types.SimpleNamespace(__version__="0.7.1", LoraConfig=lora_config)
    monkeypatch.setattr(peft_model, "_peft", lambda: fake)


class _OldPeftModel:
    """PEFT 0.7-0.15's ``merge_adapter(adapter_names=None)``: no safe_merge keyword."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    def merge_adapter(self, adapter_names=None) -> None:
        self.calls.append(adapter_names)


def test_options_the_release_lacks_are_not_declared(monkeypatch):
    _old_peft(monkeypatch)
    caps = peft_model.PeftModelTarget().capabilities()
    assert "rslora" not in caps.options and "dora" not in caps.options
    assert caps.notes["rslora"] == "peft 0.7.1: LoraConfig has no use_rslora"
    assert caps.notes["dora"] == "peft 0.7.1: LoraConfig has no use_dora"
    assert "multi_adapter" in caps.options


def test_configs_without_rslora_or_dora_build_and_with_them_are_unsupported(monkeypatch):
    _old_peft(monkeypatch)
    ab = AdapterSpec(name="a", A=torch.ones(1, 2), B=torch.ones(2, 1), r=1, alpha=1.0)
    plain = ModelAdapter("a", {"model.layers.0.mlp.up_proj": ab})
    assert peft_model._config(plain) == {"target_modules": ["model.layers.0.mlp.up_proj"], "r": 1}
    for option, field in (("use_rslora", "use_rslora"), ("use_dora", "use_dora")):
        adapter = ModelAdapter("a", {"model.layers.0.mlp.up_proj": ab}, **{option: True})
        with pytest.raises(Unsupported, match=f"peft 0.7.1: LoraConfig has no {field}"):
            peft_model._config(adapter)


def test_installed_release_declares_the_options_its_config_has():
    import inspect

    import peft

    fields = inspect.signature(peft.LoraConfig).parameters
    caps = peft_model.PeftModelTarget().capabilities()
    assert ("rslora" in caps.options) == ("use_rslora" in fields)
    assert ("dora" in caps.options) == ("use_dora" in fields)


def test_plain_merge_sends_no_safe_merge_keyword_and_safe_merge_is_unsupported(monkeypatch):
    _old_peft(monkeypatch)
    model = _OldPeftModel()
    handle = peft_model.PeftModelHandle(model, peft_wrapped=True)
    handle.merge(adapter_names=["a"])
    handle.merge()
    assert model.calls == [["a"], None]
    with pytest.raises(Unsupported, match="peft 0.7.1: merge_adapter has no safe_merge"):
        handle.merge(safe=True)
    assert model.calls == [["a"], None]


class _BrokenBase(torch.nn.Module):
    """A base model whose own forward fails, as transformers 4.36's Llama does in float64."""

    def forward(self, input_ids, attention_mask):
        raise RuntimeError("value cannot be converted to type float without overflow")


def test_a_base_model_the_installed_transformers_cannot_run_is_a_reason_not_an_error(monkeypatch):
    from properties.models import architectures as archs

    pytest.importorskip("transformers")
    monkeypatch.setattr(archs, "_prototype", lambda *key: _BrokenBase())
    archs.cannot_run.cache_clear()
    try:
        why = archs.cannot_run("llama", (("vocab_size", 8),), torch.float64, "cpu")
    finally:
        archs.cannot_run.cache_clear()
    assert why is not None
    assert "cannot run a plain LlamaForCausalLM in float64" in why
    assert "RuntimeError: value cannot be converted to type float without overflow" in why
    assert "no LoRA involved" in why


def test_the_installed_transformers_runs_every_architecture_in_every_dtype():
    """The probe finds nothing to skip on the release the suite is tested with (transformers 5)."""
    from properties.models import architectures as archs
    from properties.spec import DTYPES

    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        # Older releases' own masks overflow in float64 (4.36 Llama, 4.50 GPT-2): the probe is meant to
        # skip those bases there, so this holds only for the transformers the suite is tested with.
        pytest.skip(f"transformers {transformers.__version__}: the probe skips some bases by design")
    llama = dict(vocab_size=8, hidden_size=4, head_dim=2, intermediate_size=4, num_hidden_layers=1)
    llama.update(num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    configs = {
        "llama": {**llama, "tie_word_embeddings": False},
        "llama_tied": {**llama, "tie_word_embeddings": True},
        "gpt2": dict(vocab_size=8, n_embd=2, n_head=1, n_layer=1, n_inner=2, n_positions=8),
        "bert": dict(
            vocab_size=8, hidden_size=2, num_attention_heads=1, intermediate_size=2, num_hidden_layers=1
        ),
    }
    for arch, config in configs.items():
        for dtype in DTYPES.values():
            assert archs.cannot_run(arch, tuple(sorted(config.items())), dtype, "cpu") is None, (arch, dtype)


def test_snapshot_reads_a_magnitude_store_that_is_none_as_empty():
    """PEFT 0.9-0.10 keep ``lora_magnitude_vector = None`` (and older ones no ``_caches``) until a DoRA
    adapter exists; the snapshot a safe-merge check compares must treat that as "no DoRA state"."""
    from properties.spec import LayerSpec
    from properties.targets.peft_target import TARGET

    g = torch.Generator().manual_seed(0)
    a = AdapterSpec("a", r=1, alpha=2.0, A=torch.randn(1, 3, generator=g), B=torch.randn(2, 1, generator=g))
    handle = TARGET.build(LayerSpec("linear", torch.float32, torch.randn(2, 3, generator=g), (a,)))
    expected = handle.snapshot()
    for m in handle._lora_layers():
        m.lora_magnitude_vector = None
        m._caches = None
    got = handle.snapshot()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items() if isinstance(v, torch.Tensor))


class _RefusingPeftModel:
    """PEFT 0.7's ``_unloading_checks``: several active adapters with ``modules_to_save`` are refused."""

    def __init__(self, message: str) -> None:
        self.message = message

    def merge_and_unload(self, safe_merge=False):
        raise ValueError(self.message)

    def unload(self):
        raise ValueError(self.message)


def test_peft_0_7_refusing_to_unload_several_modules_to_save_adapters_is_unsupported(monkeypatch):
    _old_peft(monkeypatch)
    refusing = _RefusingPeftModel("Cannot unload multiple adapters that specify `modules_to_save`.")
    handle = peft_model.PeftModelHandle(refusing, peft_wrapped=True)
    for call in (handle.merge_and_unload, handle.unload):
        with pytest.raises(Unsupported, match="peft 0.7.1: Cannot unload multiple adapters"):
            call()
    other = peft_model.PeftModelHandle(_RefusingPeftModel("something else broke"), peft_wrapped=True)
    with pytest.raises(ValueError, match="something else broke"):  # any other error stays a crash
        other.merge_and_unload()


class _NoDoraEmbeddingPeftModel:
    """PEFT 0.9-0.12: DoRA on Linear only; an adapter with DoRA on an embedding is refused by design."""

    def __init__(self, message: str) -> None:
        self.message = message

    def add_adapter(self, name, config):
        raise ValueError(self.message)


def test_peft_refusing_dora_on_an_embedding_is_unsupported_and_other_errors_stay_crashes(monkeypatch):
    _old_peft(monkeypatch)
    monkeypatch.setattr(peft_model, "_config", lambda adapter: {})
    ab = AdapterSpec(name="a", A=torch.ones(1, 2), B=torch.ones(2, 1), r=1, alpha=1.0)
    adapter = ModelAdapter("other", {"model.embed_tokens": ab}, use_dora=True)
    refusing = _NoDoraEmbeddingPeftModel("Embedding does not support DoRA yet, please set it to False")
    handle = peft_model.PeftModelHandle(refusing, peft_wrapped=True)
    with pytest.raises(Unsupported, match="peft 0.7.1: Embedding does not support DoRA yet"):
        handle.add_adapter(adapter)
    broken = peft_model.PeftModelHandle(_NoDoraEmbeddingPeftModel("shape mismatch"), peft_wrapped=True)
    with pytest.raises(ValueError, match="shape mismatch"):
        broken.add_adapter(adapter)
