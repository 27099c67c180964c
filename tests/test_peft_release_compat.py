"""The PEFT model target on releases that lack an API (0.7-0.15): capabilities detected by feature, and
no keyword sent that the release does not take, so those cells are skipped with a reason, not errors."""

from __future__ import annotations

import types

import pytest

pytest.importorskip("peft")

from properties.models.targets import peft as peft_model  # noqa: E402
from properties.targets.protocol import Unsupported  # noqa: E402


def _old_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in PEFT 0.7 for the target: a LoraConfig without use_rslora / use_dora."""

    def lora_config(target_modules=None, r=8, lora_alpha=8, rank_pattern=None, alpha_pattern=None):
        return None

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
