"""torchtune (0.6.1) at model level: a tiny ``lora_llama3`` (the ``torchtune_llama`` architecture),
driven the way torchtune's LoRA recipes drive it.

==================  =============================================================================
protocol            torchtune
==================  =============================================================================
build               ``lora_llama3(lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output,
                    lora_rank, lora_alpha, use_dora)``; base and adapter weights loaded with
                    ``load_state_dict(strict=False)`` and checked by
                    ``validate_missing_and_unexpected_for_lora`` (the recipe's loading)
merge_and_unload    ``get_merged_lora_ckpt(state_dict, rank, alpha)``, loaded into the base
                    ``llama3(...)`` with ``load_state_dict(strict=True)`` (how a merged export is used)
disable             ``disable_adapter(model)``
save_adapter        ``get_adapter_state_dict(model.state_dict())`` saved with ``torch.save`` as
                    ``adapter_model.pt`` (what torchtune's checkpointer writes), plus the LoRA
                    settings the recipe's config holds (``adapter_config.json``)
save_merged         ``torch.save`` of the merged state dict / ``llama3(...)`` + ``load_state_dict``
==================  =============================================================================

What torchtune lacks is declared: an in-place merge and unmerge (the merge rewrites a checkpoint),
``unload``, a safe merge, more than one adapter (so adding, deleting and switching adapters), rsLoRA,
and LoRA on the token embedding. One rank and one alpha hold for the whole model.
A refusal of ``validate_missing_and_unexpected_for_lora`` (an ``AssertionError``) is reported as the
``ValueError`` the properties treat as "the library refused".
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from properties.models import architectures as archs
from properties.models import torchtune_llama as tt
from properties.models.spec import ARCHITECTURES, ModelAdapter, ModelSpec
from properties.models.targets._torch import TorchModelHandle
from properties.spec import DTYPES
from properties.targets._library import distribution_version
from properties.targets.protocol import Capabilities, Unsupported
from properties.targets.torchtune_target import _peft

ADAPTER_FILE, CONFIG_FILE, MERGED_FILE = "adapter_model.pt", "adapter_config.json", "model.pt"
_ADAPTER_KEYS = ("lora_a", "lora_b", "magnitude")


def _settings(adapter: ModelAdapter) -> dict[str, Any]:
    """The LoRA part of a torchtune recipe config for ``adapter`` (one rank and alpha: the draw's)."""
    groups = sorted({tt.group_of(p) for p in adapter.modules})
    if None in groups:
        raise Unsupported(
            f"torchtune cannot put a LoRA on {[p for p in adapter.modules if not tt.group_of(p)]}"
        )
    first = next(iter(adapter.modules.values()))
    if any((a.r, a.alpha) != (first.r, first.alpha) for a in adapter.modules.values()):
        raise Unsupported("torchtune has one lora_rank and lora_alpha per model")
    if adapter.use_rslora:
        raise Unsupported("torchtune has no rsLoRA")
    if not set(groups) & set(tt.ATTENTION):
        raise Unsupported("torchtune's lora_llama3 needs a LoRA on at least one attention projection")
    return {"groups": groups, "rank": first.r, "alpha": first.alpha, "dora": adapter.use_dora}


def _validate(settings: dict[str, Any], missing: list[str], unexpected: list[str], which: str) -> None:
    peft = _peft()
    groups = settings["groups"]
    kwargs = {f"{which}_missing": missing, f"{which}_unexpected": unexpected}
    try:
        peft.validate_missing_and_unexpected_for_lora(
            [g for g in tt.ATTENTION if g in groups], "mlp" in groups, "output" in groups, **kwargs
        )
    except AssertionError as e:
        raise ValueError(f"torchtune refused the state dict: {e}") from e


class TorchtuneModelHandle(TorchModelHandle):
    def __init__(self, root: nn.Module, spec: ModelSpec, settings: dict[str, Any] | None) -> None:
        super().__init__(root)
        self.spec = spec
        self.settings = settings  # None once merged and unloaded (a plain llama3)
        self.name = spec.adapter_names[0] if spec.adapters else "default"

    def _base_name(self, name: str) -> str | None:
        leaf = name.rpartition(".")[2]
        if any(k in name for k in _ADAPTER_KEYS[:2]) or leaf == "magnitude":
            return None
        return name

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {}
        for path, m in self.root.named_modules():
            if hasattr(m, "lora_a"):
                out[f"{path}/A"] = m.lora_a.weight.detach()
                out[f"{path}/B"] = m.lora_b.weight.detach()
                if getattr(m, "magnitude", None) is not None:
                    out[f"{path}/magnitude"] = m.magnitude.detach()
        return out

    def merge_and_unload(self, *, safe: bool = False) -> None:
        if safe:
            raise Unsupported("get_merged_lora_ckpt has no finiteness check")
        if self.settings is None:
            raise ValueError("already merged: no LoRA left")
        state = {k: v.detach().clone() for k, v in self.root.state_dict().items()}
        merged = _peft().get_merged_lora_ckpt(state, rank=self.settings["rank"], alpha=self.settings["alpha"])
        with torch.device(self.spec.device):
            base = tt.construct(self.spec.config, self.spec.dtype)
        base.load_state_dict(merged, strict=True)
        self.root, self.settings = base.eval(), None

    @contextmanager
    def disabled(self) -> Iterator[None]:
        with _peft().disable_adapter(self.root):
            yield

    def save_adapter(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(_peft().get_adapter_state_dict(self.root.state_dict()), directory / ADAPTER_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(self.settings))

    def saved_tensors(self, directory: Path) -> dict[str, torch.Tensor]:
        return torch.load(directory / ADAPTER_FILE, weights_only=True)

    def load_adapter(self, directory: Path, name: str) -> list[str]:
        settings = json.loads((directory / CONFIG_FILE).read_text())
        missing, unexpected = self.root.load_state_dict(self.saved_tensors(directory), strict=False)
        _validate(settings, missing, unexpected, "lora")
        return []

    def save_merged(self, directory: Path) -> None:
        if self.settings is not None:
            raise ValueError("the model still holds LoRA layers: merge first")
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.root.state_dict(), directory / MERGED_FILE)

    # -- what torchtune does not have -------------------------------------------------------------

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        raise Unsupported("torchtune merges a checkpoint (get_merged_lora_ckpt), not the model in place")

    def unmerge(self) -> None:
        raise Unsupported("torchtune has no unmerge")

    def unload(self) -> None:
        raise Unsupported("torchtune has no unload")

    def set_active(self, names: Sequence[str]) -> None:
        if list(names) != [self.name]:
            raise Unsupported("torchtune has one adapter per model")

    def add_adapter(self, adapter: ModelAdapter) -> None:
        raise Unsupported("torchtune has one adapter per model")

    def delete_adapter(self, name: str) -> None:
        raise Unsupported("torchtune has one adapter per model")

    def add_weighted_adapter(self, names: Sequence[str], weights: Sequence[float], new_name: str) -> None:
        raise Unsupported("torchtune has no weighted combination of adapters")


class TorchtuneModelTarget:
    """torchtune's ``lora_llama3`` on the ``torchtune_llama`` architecture."""

    name = "torchtune"
    is_model_target = True

    def version(self) -> str:
        _peft()
        return distribution_version("torchtune")

    def capabilities(self) -> Capabilities:
        _peft()
        v = f"torchtune {distribution_version('torchtune')}"
        lacks = {
            "merge": "get_merged_lora_ckpt merges a state dict, not the model in place",
            "unmerge": "no unmerge",
            "unload": "no unload (disable_adapter exists, but nothing gives the base model back)",
            "safe_merge": "get_merged_lora_ckpt has no finiteness check",
            "set_active": "one adapter per model",
            "add_adapter": "one adapter per model",
            "delete_adapter": "one adapter per model",
            "weighted_cat": "no weighted combination of adapters",
            "multi_adapter": "one adapter per model",
            "rslora": "scaling is alpha / rank only",
        }
        notes = {k: f"{v}: {why}" for k, why in lacks.items()}
        notes.update(
            {
                a: f"{v}: its models are its own (torchtune_llama)"
                for a in ARCHITECTURES
                if a != tt.ARCHITECTURE
            }
        )
        why = archs.unavailable_notes().get(tt.ARCHITECTURE)
        if why:
            notes[tt.ARCHITECTURE] = why
        return Capabilities(
            layers=frozenset(() if why else {tt.ARCHITECTURE}),
            dtypes=frozenset(DTYPES.values()),
            operations=frozenset({"merge_and_unload", "disable", "save_adapter", "save_merged"}),
            options=frozenset({"dora"}),
            notes=notes,
        )

    def build_base(self, spec: ModelSpec) -> TorchtuneModelHandle:
        return TorchtuneModelHandle(archs.build_base(spec), spec, None)

    def _lora_model(self, spec: ModelSpec, settings: dict[str, Any]) -> nn.Module:
        with torch.device(spec.device):
            model = tt.construct_lora(
                spec.config, spec.dtype, set(settings["groups"]), settings["rank"], settings["alpha"],
                settings["dora"],
            )  # fmt: skip
        missing, unexpected = model.load_state_dict(spec.base, strict=False)
        _validate(settings, missing, unexpected, "base")
        return model.eval()

    def build(self, spec: ModelSpec) -> TorchtuneModelHandle:
        if len(spec.adapters) != 1:
            raise Unsupported("torchtune has one adapter per model")
        adapter = spec.adapters[0]
        settings = _settings(adapter)
        model = self._lora_model(spec, settings)
        factors = {}
        for path, a in adapter.modules.items():
            factors[f"{path}.lora_a.weight"] = a.A
            factors[f"{path}.lora_b.weight"] = a.B
            if a.magnitude is not None:
                factors[f"{path}.magnitude"] = a.magnitude
        missing, unexpected = model.load_state_dict(factors, strict=False)
        _validate(settings, missing, unexpected, "lora")
        return TorchtuneModelHandle(model, spec, settings)

    def load_adapter(
        self, spec: ModelSpec, directory: Path, name: str
    ) -> tuple[TorchtuneModelHandle, list[str]]:
        settings = json.loads((directory / CONFIG_FILE).read_text())
        h = TorchtuneModelHandle(self._lora_model(spec, settings), spec, settings)
        return h, h.load_adapter(directory, name)

    def load_merged(self, spec: ModelSpec, directory: Path) -> TorchtuneModelHandle:
        with torch.device(spec.device):
            model = tt.construct(spec.config, spec.dtype)
        model.load_state_dict(torch.load(directory / MERGED_FILE, weights_only=True), strict=True)
        return TorchtuneModelHandle(model.eval(), spec, None)


TARGET = TorchtuneModelTarget()
