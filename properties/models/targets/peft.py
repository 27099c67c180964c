"""Hugging Face PEFT + transformers at model level: ``get_peft_model`` with one ``LoraConfig`` per
adapter (exact module paths as ``target_modules``, per-module ranks and alphas as ``rank_pattern`` /
``alpha_pattern``), driven through PEFT's model API: ``merge_adapter`` / ``unmerge_adapter``,
``merge_and_unload(safe_merge=...)``, ``unload``, ``disable_adapter()``, ``add_adapter`` /
``set_adapter`` / ``delete_adapter``, ``add_weighted_adapter(combination_type="cat")``,
``save_pretrained`` / ``PeftModel.from_pretrained`` / ``load_adapter``. A merged model is saved and
reloaded with transformers (``save_pretrained`` / ``from_pretrained``), the path PEFT documents.

PEFT's configuration defaults are kept as a user gets them (``ensure_weight_tying`` off): the suite
judges behaviour, and warnings are recorded as what the library reported, not as errors.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from properties.models import architectures as archs
from properties.models.protocol import full_model_capabilities
from properties.models.spec import ModelAdapter, ModelSpec
from properties.models.targets._torch import TorchModelHandle
from properties.targets.peft_target import _peft, _set
from properties.targets.protocol import Capabilities, Unsupported

PREFIX = "base_model.model"


def _config(adapter: ModelAdapter) -> Any:
    """One ``LoraConfig``; an option is passed only when on, so releases without the field
    (``use_rslora`` before 0.8, ``use_dora`` before 0.9) still take every config that does not use it."""
    first = next(iter(adapter.modules.values()))
    options = {"use_rslora": adapter.use_rslora, "use_dora": adapter.use_dora}
    fields = inspect.signature(_peft().LoraConfig).parameters
    for field, on in options.items():
        if on and field not in fields:
            raise Unsupported(f"peft {_peft().__version__}: LoraConfig has no {field}")
    extra: dict[str, Any] = {}
    if adapter.lora_bias:  # only drawn when the release has it (PEFT >= 0.14)
        extra["lora_bias"] = True
    if adapter.modules_to_save:
        extra["modules_to_save"] = list(adapter.modules_to_save)
    return _peft().LoraConfig(
        target_modules=list(adapter.modules),
        r=first.r,
        lora_alpha=first.alpha,
        rank_pattern={p: a.r for p, a in adapter.modules.items()},
        alpha_pattern={p: a.alpha for p, a in adapter.modules.items()},
        init_lora_weights=False,
        **{field: True for field, on in options.items() if on},
        **extra,
    )


@contextmanager
def _recorded() -> Iterator[list[str]]:
    """Collect what PEFT warns (a report, for the properties to judge)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        messages: list[str] = []
        yield messages
    messages.extend(str(w.message) for w in caught)


# PEFT 0.7 refuses, by design, to unload (or merge and unload) several active adapters when any of them
# has `modules_to_save` (`_unloading_checks`; LoRA stopped calling it in 0.8): a capability the release
# lacks, not a wrong result, so such an example is unsupported there rather than a crash.
_UNLOAD_REFUSAL = "Cannot unload multiple adapters that specify `modules_to_save`"


# PEFT 0.9-0.12 have DoRA for Linear (and Conv2d from 0.10) but not for Embedding: building such an adapter
# raises "Embedding does not support DoRA yet, please set it to False" (the layer target skips those cells
# the same way). An example with DoRA on an embedding is unsupported there.
_DORA_REFUSAL = "does not support DoRA"


@contextmanager
def _refused(message: str) -> Iterator[None]:
    """PEFT's ``ValueError`` containing ``message`` (a refusal by design) becomes :class:`Unsupported`;
    any other error stays a crash."""
    try:
        yield
    except ValueError as e:
        if message not in str(e):
            raise
        raise Unsupported(f"peft {_peft().__version__}: {e}") from e


def _adapter_dir(directory: Path, name: str) -> Path:
    """``save_pretrained`` writes the adapter named ``default`` at the top and others in a subfolder."""
    return directory if name == "default" else directory / name


class PeftModelHandle(TorchModelHandle):
    def __init__(self, root: nn.Module, peft_wrapped: bool) -> None:
        super().__init__(root)
        self.prefix = PREFIX if peft_wrapped else ""

    @property
    def peft_model(self) -> Any:
        if not self.prefix:
            raise ValueError("the model was unloaded: no PEFT model is left")
        return self.root

    def _lora_layers(self) -> dict[str, nn.Module]:
        lora_layer = _peft().tuners.lora.LoraLayer
        start = len(self.prefix) + 1 if self.prefix else 0
        return {n[start:]: m for n, m in self.root.named_modules() if isinstance(m, lora_layer)}

    def load_factors(self, adapter: ModelAdapter) -> None:
        layers = self._lora_layers()
        for path, a in adapter.modules.items():
            layer = layers[path]
            if isinstance(layer.get_base_layer(), nn.Embedding):
                _set(layer.lora_embedding_A[adapter.name], a.A)
                _set(layer.lora_embedding_B[adapter.name], a.B)
            else:
                _set(layer.lora_A[adapter.name], a.A)
                _set(layer.lora_B[adapter.name], a.B)
            if a.bias is not None:
                _set(layer.lora_B[adapter.name].bias, a.bias)
            if a.magnitude is not None:
                _set(layer.lora_magnitude_vector[adapter.name], a.magnitude)
        saved = self._saved()
        for path, params in adapter.modules_to_save.items():
            copy = dict(saved[path].modules_to_save[adapter.name].named_parameters())
            for key, value in params.items():
                _set(copy[key], value)

    def _saved(self) -> dict[str, nn.Module]:
        """PEFT's ``ModulesToSaveWrapper`` modules, by model path."""
        start = len(self.prefix) + 1 if self.prefix else 0
        return {
            n[start:]: m
            for n, m in self.root.named_modules()
            if type(m).__name__ == "ModulesToSaveWrapper" and hasattr(m, "modules_to_save")
        }

    # -- ModelHandle -------------------------------------------------------------------------------

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {}
        for path, layer in self._lora_layers().items():
            emb = isinstance(layer.get_base_layer(), nn.Embedding)
            stores = (
                ("A", layer.lora_embedding_A if emb else layer.lora_A),
                ("B", layer.lora_embedding_B if emb else layer.lora_B),
                ("magnitude", getattr(layer, "lora_magnitude_vector", None) or {}),
            )
            for key, store in stores:
                if name in store:
                    v = store[name]
                    out[f"{path}/{key}"] = (v if isinstance(v, torch.Tensor) else v.weight).detach()
            bias = getattr(layer.lora_B[name], "bias", None) if not emb and name in layer.lora_B else None
            if bias is not None:
                out[f"{path}/bias"] = bias.detach()
        for path, wrapper in self._saved().items():
            if name in wrapper.modules_to_save:
                for key, p in wrapper.modules_to_save[name].named_parameters():
                    out[f"{path}/saved.{key}"] = p.detach()
        return out

    def snapshot(self) -> dict[str, object]:
        snap = super().snapshot()
        for path, layer in self._lora_layers().items():
            snap[f"{path}:merged"] = list(layer.merged_adapters)
            snap[f"{path}:active"] = list(layer.active_adapters)
            snap[f"{path}:disabled"] = bool(layer.disable_adapters)
        return snap

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        names = None if adapter_names is None else list(adapter_names)
        if not safe:  # PEFT < 0.16: merge_adapter has no safe_merge keyword at all
            self.peft_model.merge_adapter(adapter_names=names)
            return
        if "safe_merge" not in inspect.signature(self.peft_model.merge_adapter).parameters:
            raise Unsupported(f"peft {_peft().__version__}: merge_adapter has no safe_merge")
        self.peft_model.merge_adapter(adapter_names=names, safe_merge=True)

    def unmerge(self) -> None:
        self.peft_model.unmerge_adapter()

    def merge_and_unload(self, *, safe: bool = False) -> None:
        with _refused(_UNLOAD_REFUSAL):
            self.root, self.prefix = self.peft_model.merge_and_unload(safe_merge=safe), ""

    def unload(self) -> None:
        with _refused(_UNLOAD_REFUSAL):
            self.root, self.prefix = self.peft_model.unload(), ""

    @contextmanager
    def disabled(self) -> Iterator[None]:
        with self.peft_model.disable_adapter():
            yield

    def set_active(self, names: Sequence[str]) -> None:
        self.peft_model.base_model.set_adapter(list(names))

    def add_adapter(self, adapter: ModelAdapter) -> None:
        with _refused(_DORA_REFUSAL):
            self.peft_model.add_adapter(adapter.name, _config(adapter))
        self.load_factors(adapter)

    def delete_adapter(self, name: str) -> None:
        self.peft_model.delete_adapter(name)

    def add_weighted_adapter(self, names: Sequence[str], weights: Sequence[float], new_name: str) -> None:
        self.peft_model.add_weighted_adapter(
            adapters=list(names), weights=list(weights), adapter_name=new_name, combination_type="cat"
        )

    def save_adapter(self, directory: Path, name: str) -> None:
        self.peft_model.save_pretrained(str(directory), selected_adapters=[name])
        self._saved_name = name

    def saved_tensors(self, directory: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        files = sorted(directory.rglob("adapter_model.safetensors"))
        out = {}
        for f in files:
            out.update({f"{f.parent.relative_to(directory)}/{k}": v for k, v in load_file(str(f)).items()})
        return out

    def load_adapter(self, directory: Path, name: str) -> list[str]:
        with _recorded() as reports:
            self.peft_model.load_adapter(str(_adapter_dir(directory, name)), adapter_name=name)
        return reports

    def save_merged(self, directory: Path) -> None:
        if self.prefix:
            raise ValueError("still a PeftModel: merge_and_unload first")
        self.root.save_pretrained(str(directory))


class PeftModelTarget:
    """PEFT (installed release) on the transformers architectures of the model half."""

    name = "peft"
    is_model_target = True

    def version(self) -> str:
        return str(_peft().__version__)

    @cached_property
    def _capabilities(self) -> Capabilities:
        """Every model operation and option, less the options the installed ``LoraConfig`` lacks
        (``use_rslora`` from 0.8, ``use_dora`` from 0.9): detected by field, not by a version table.
        The library architectures (``unet``, ``torchtune_llama``, ``litgpt``) are driven through their own
        libraries' targets (diffusers' is PEFT underneath)."""
        full = full_model_capabilities()
        own = {a: f"{a} is driven through its own library's model target" for a in archs.FAMILIES}
        fields = inspect.signature(_peft().LoraConfig).parameters
        notes = dict(full.notes)
        options = set(full.options)
        for option, field in (("rslora", "use_rslora"), ("dora", "use_dora"), ("lora_bias", "lora_bias")):
            if field not in fields:
                options.discard(option)
                notes[option] = f"peft {self.version()}: LoraConfig has no {field}"
        return Capabilities(
            layers=full.layers - set(own),
            dtypes=full.dtypes,
            operations=full.operations,
            options=frozenset(options),
            notes={**own, **notes},
        )

    def capabilities(self) -> Capabilities:
        return self._capabilities

    def build_base(self, spec: ModelSpec) -> PeftModelHandle:
        return PeftModelHandle(archs.build_base(spec), peft_wrapped=False)

    def build(self, spec: ModelSpec) -> PeftModelHandle:
        first, *rest = spec.adapters
        with _refused(_DORA_REFUSAL):
            model = _peft().get_peft_model(archs.build_base(spec), _config(first), adapter_name=first.name)
        h = PeftModelHandle(model, peft_wrapped=True)
        h.load_factors(first)
        for a in rest:
            h.add_adapter(a)
        h.set_active(spec.active_adapters)
        model.eval()
        return h

    def load_adapter(self, spec: ModelSpec, directory: Path, name: str) -> tuple[PeftModelHandle, list[str]]:
        with _recorded() as reports:
            model = _peft().PeftModel.from_pretrained(
                archs.build_base(spec), str(_adapter_dir(directory, name)), adapter_name=name
            )
        return PeftModelHandle(model.eval(), peft_wrapped=True), reports

    def load_merged(self, spec: ModelSpec, directory: Path) -> PeftModelHandle:
        model = archs.from_pretrained(spec, str(directory))
        return PeftModelHandle(model.eval(), peft_wrapped=False)


TARGET = PeftModelTarget()
