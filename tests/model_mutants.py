"""Deliberately broken model-level implementations: one bug each, to prove the model properties bite.

Each mutant is the reference model target with one method of its handle (or the target) replaced, so
``lora_core`` is never touched. ``catches`` names the properties that must fail on it; the first one,
with ``layer`` (architecture) and ``dtype``, is the cell ``tests/test_model_mutants.py`` runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import lora_core
from properties.models.spec import ModelAdapter
from properties.models.targets.reference import (
    ReferenceModelHandle,
    ReferenceModelTarget,
    lora_core_adapter,
)
from properties.runner import Cell


class TiedTwinWritten(ReferenceModelHandle):
    """Merges every layer in place without untying: a tied twin is written through the shared tensor."""

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        for layer in self._layers().values():
            layer.merge(safe_merge=safe)

    def merge_and_unload(self, *, safe: bool = False) -> None:
        self.merge(safe=safe)
        self.root = lora_core.model._replace_layers(self.root, keep_merged=True)


class MergeSkipsEmbeddings(ReferenceModelHandle):
    """merge_and_unload unloads embedding layers without merging them: their LoRA is lost."""

    def merge_and_unload(self, *, safe: bool = False) -> None:
        for layer in self._layers().values():
            if not isinstance(layer, lora_core.Embedding):
                layer.merge(safe_merge=safe)
        self.root = lora_core.model._replace_layers(self.root, keep_merged=True)


class SavesTheBase(ReferenceModelHandle):
    """save_merged saves a copy of the model as it was before the merge (the base), not the merged one."""

    def merge_and_unload(self, *, safe: bool = False) -> None:
        import copy

        self._before = copy.deepcopy(lora_core.model.unload(copy.deepcopy(self.root)))
        super().merge_and_unload(safe=safe)

    def save_merged(self, directory: Path) -> None:
        self._before.save_pretrained(str(directory))


class AppliedTwiceOnReload(ReferenceModelHandle):
    """Loading an adapter whose name is taken adds it again under a new name, active: a doubled effect."""

    def load_adapter(self, directory: Path, name: str) -> list[str]:
        taken = any(name in layer.r for layer in self._layers().values())
        return super().load_adapter(directory, f"{name}_1" if taken else name)


class KeysDroppedOnLoad(ReferenceModelHandle):
    """Modules of a saved adapter the model does not have are skipped silently."""

    def load_adapter(self, directory: Path, name: str) -> list[str]:
        import json

        from properties.models.targets.reference import CONFIG_FILE

        config = json.loads((directory / CONFIG_FILE).read_text())
        tensors = self.saved_tensors(directory)
        here = dict(self.root.named_modules())
        modules = {
            p: lora_core_adapter(
                name, m["r"], tensors[f"{p}/A"], tensors[f"{p}/B"], m["lora_alpha"], config["use_rslora"]
            )
            for p, m in config["modules"].items()
            if p in here
        }
        self.add_adapter(ModelAdapter(name, modules, config["use_rslora"]))
        self.set_active([*self.active, name])
        return []


class WrapperLeftBehind(ReferenceModelHandle):
    """merge_and_unload merges but leaves the LoRA wrappers in the model."""

    def merge_and_unload(self, *, safe: bool = False) -> None:
        self.merge(safe=safe)


class SafeMergeNotAtomic(ReferenceModelHandle):
    """Safe merge checks and writes one layer at a time: a late refusal leaves earlier layers merged."""

    def merge_and_unload(self, *, safe: bool = False) -> None:
        for layer in self._layers().values():
            layer.merge(safe_merge=safe)
        self.root = lora_core.model._replace_layers(self.root, keep_merged=True)


class UnloadMerges(ReferenceModelHandle):
    """unload() merges before it unloads (it should hand back the untouched base)."""

    def unload(self) -> None:
        self.merge_and_unload()


class AddAdapterRescalesOthers(ReferenceModelHandle):
    """add_adapter gives every adapter on the layers it touches the new adapter's scaling."""

    def add_adapter(self, adapter: ModelAdapter) -> None:
        super().add_adapter(adapter)
        for path in adapter.modules:
            layer = self.root.get_submodule(path)
            for n in layer.scaling:
                layer.scaling[n] = layer.scaling[adapter.name]


class AdapterFileHoldsBase(ReferenceModelHandle):
    """save_adapter also writes the targeted modules' base weights into the adapter file."""

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = super().adapter_tensors(name)
        if getattr(self, "_saving", False):
            for path, layer in self._layers().items():
                if name in layer.r:
                    out[f"{path}/base"] = layer.base_layer.weight.detach()
        return out

    def save_adapter(self, directory: Path, name: str) -> None:
        self._saving = True
        try:
            super().save_adapter(directory, name)
        finally:
            self._saving = False


class WeightedIgnoresWeights(ReferenceModelHandle):
    """add_weighted_adapter (cat) concatenates the adapters with weight 1 each."""

    def add_weighted_adapter(self, names: Sequence[str], weights: Sequence[float], new_name: str) -> None:
        super().add_weighted_adapter(names, [1.0] * len(names), new_name)


class LoraBiasMergedUnscaled(ReferenceModelHandle):
    """merge_and_unload adds the LoRA bias to the base bias without its scaling ``alpha / r``."""

    def merge_and_unload(self, *, safe: bool = False) -> None:
        fix = [
            (layer.base_layer, layer.lora_bias[n].detach().clone(), layer.scaling[n])
            for layer in self._layers().values()
            for n in layer.active_adapters
            if n in layer.lora_bias
        ]
        super().merge_and_unload(safe=safe)
        with torch.no_grad():
            for base, b, s in fix:
                base.bias.copy_((base.bias.double() + (1 - s) * b.double()).to(base.bias.dtype))


class TrainedCopyLostOnSave(ReferenceModelHandle):
    """save_adapter writes the LoRA factors but not the trained copies of modules_to_save."""

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = super().adapter_tensors(name)
        if getattr(self, "_saving", False):
            out = {k: v for k, v in out.items() if "/saved." not in k}
        return out

    def save_adapter(self, directory: Path, name: str) -> None:
        self._saving = True
        try:
            super().save_adapter(directory, name)
        finally:
            self._saving = False


class UnloadKeepsTrainedCopy(ReferenceModelHandle):
    """unload() leaves the active adapter's trained copy of a module to save in place of the original."""

    def unload(self) -> None:
        for saved in self._saved().values():
            saved.original_module = saved.in_force(ignore_disabled=True)
        super().unload()


class MergeDropsTrainedCopy(ReferenceModelHandle):
    """merge_and_unload puts the original module back where a module to save was (training lost)."""

    def merge_and_unload(self, *, safe: bool = False) -> None:
        for saved in self._saved().values():
            saved.active_adapter = None
        super().merge_and_unload(safe=safe)


class DisableKeepsTrainedCopy(ReferenceModelHandle):
    """Disabling adapters disables the LoRA layers but leaves the trained copies of modules to save in use."""

    @contextmanager
    def disabled(self) -> Iterator[None]:
        layers = list(self._layers().values())
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)


class UnmergeLeavesDelta(ReferenceModelHandle):
    """unmerge() forgets the modules' merged state without subtracting: the merged weights stay."""

    def unmerge(self) -> None:
        for layer in self._layers().values():
            layer.merged_adapters.clear()


@dataclass(frozen=True)
class ModelMutant:
    name: str
    catches: tuple[str, ...]
    layer: str
    dtype: str
    handle: type[ReferenceModelHandle]

    @property
    def cell(self) -> Cell:
        return Cell(self.catches[0], self.layer, self.dtype)

    def target(self) -> MutantModelTarget:
        return MutantModelTarget(self)


class MutantModelTarget(ReferenceModelTarget):
    """The reference model target, except every handle it builds is the mutant's handle class."""

    def __init__(self, mutant: ModelMutant) -> None:
        self.mutant = mutant
        self.name = f"mutant-{mutant.name}"

    def build_base(self, spec):
        from properties.models import architectures as archs

        return self.mutant.handle(archs.build_base(spec), spec)

    def load_merged(self, spec, directory):
        h = super().load_merged(spec, directory)
        return self.mutant.handle(h.root, spec)


MODEL_MUTANTS: tuple[ModelMutant, ...] = (
    ModelMutant(
        "merge_skips_embeddings", ("model_merge_equivalence",), "bert", "float32", MergeSkipsEmbeddings
    ),
    ModelMutant("saves_the_base", ("model_merged_save_load",), "llama", "bfloat16", SavesTheBase),
    ModelMutant(
        "tied_twin_written",
        ("model_tied_weights", "model_merge_equivalence"),
        "llama_tied",
        "float32",
        TiedTwinWritten,
    ),
    ModelMutant(
        "applied_twice_on_reload", ("model_adapter_save_load",), "llama", "float32", AppliedTwiceOnReload
    ),
    ModelMutant("keys_dropped_on_load", ("model_adapter_save_load",), "gpt2", "float32", KeysDroppedOnLoad),
    ModelMutant("wrapper_left_behind", ("model_unloaded_is_plain",), "bert", "float32", WrapperLeftBehind),
    ModelMutant("safe_merge_not_atomic", ("model_safe_merge",), "llama", "float32", SafeMergeNotAtomic),
    ModelMutant("unload_merges", ("model_unload_restores_base",), "gpt2", "bfloat16", UnloadMerges),
    ModelMutant(
        "add_adapter_rescales_others",
        ("model_adapter_isolation",),
        "llama",
        "float32",
        AddAdapterRescalesOthers,
    ),
    ModelMutant(
        "adapter_file_holds_base", ("model_adapter_save_load",), "bert", "float32", AdapterFileHoldsBase
    ),
    ModelMutant(
        "weighted_ignores_weights", ("model_adapter_isolation",), "bert", "float32", WeightedIgnoresWeights
    ),
    ModelMutant("unmerge_leaves_delta", ("model_merge_unmerge",), "llama", "float32", UnmergeLeavesDelta),
    ModelMutant(
        "lora_bias_merged_unscaled", ("model_merge_equivalence",), "gpt2", "float32", LoraBiasMergedUnscaled
    ),
    ModelMutant(
        "trained_copy_lost_on_save", ("model_adapter_save_load",), "llama", "float32", TrainedCopyLostOnSave
    ),
    ModelMutant(
        "unload_keeps_trained_copy",
        ("model_unload_restores_base",),
        "llama",
        "float32",
        UnloadKeepsTrainedCopy,
    ),
    ModelMutant(
        "merge_drops_trained_copy", ("model_merge_equivalence",), "bert", "float32", MergeDropsTrainedCopy
    ),
    ModelMutant(
        "disable_keeps_trained_copy",
        ("model_unload_restores_base",),
        "gpt2",
        "bfloat16",
        DisableKeepsTrainedCopy,
    ),
)

# A mutant as a ``--target module:attribute`` (for the CLI tests).
WRAPPER_LEFT_BEHIND = next(m for m in MODEL_MUTANTS if m.name == "wrapper_left_behind").target()
