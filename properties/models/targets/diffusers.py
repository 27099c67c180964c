"""diffusers (0.42, PEFT backend) at model level: LoRA on a whole ``UNet2DConditionModel`` through the
model's own ``PeftAdapterMixin`` API.

==================  =============================================================================
protocol            diffusers
==================  =============================================================================
build               ``add_adapter(LoraConfig, adapter_name)`` per adapter, then ``set_adapters``
merge / unmerge     ``fuse_lora(lora_scale=1.0, safe_fusing=..., adapter_names=...)`` / ``unfuse_lora()``
merge_and_unload    ``fuse_lora(safe_fusing=...)`` then ``unload_lora()``
unload              ``unload_lora()`` (adapters dropped, nothing fused)
disable             ``disable_lora()`` / ``enable_lora()``
set_active          ``set_adapters(names)``
delete_adapter      ``delete_adapters(name)``
save_adapter        ``save_lora_adapter(dir, adapter_name)`` (``pytorch_lora_weights.safetensors``)
load_adapter        ``load_lora_adapter(dir, prefix=None, adapter_name=...)``
save_merged         ``save_pretrained`` / ``UNet2DConditionModel.from_pretrained``
==================  =============================================================================

``load_lora_adapter`` filters keys by ``prefix``, which defaults to ``"transformer"``; the file that
``save_lora_adapter`` writes has no prefix, so the round trip needs ``prefix=None`` (with the default,
nothing is loaded and diffusers only logs a warning). Given a directory, it looks for the pickle file
``pytorch_lora_weights.bin`` unless told the safetensors name, so ``weight_name`` is passed too.
diffusers reports through its logger, not through ``warnings``: what it logs at warning level while
loading is what "the library reported".
diffusers has no ``add_weighted_adapter`` (``set_adapters(names, weights)`` mixes at run time only).
The LoRA layers are PEFT's, so their factors are read and written as the PEFT model target does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from properties.models import architectures as archs
from properties.models.protocol import MODEL_OPERATIONS, MODEL_OPTIONS
from properties.models.spec import ARCHITECTURES, ModelAdapter, ModelSpec
from properties.models.targets.peft import PeftModelHandle, _config
from properties.spec import DTYPES
from properties.targets.diffusers_target import _diffusers
from properties.targets.protocol import Capabilities, Unsupported

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
ARCHITECTURE = "unet"


class _Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _reported() -> Iterator[list[str]]:
    """What diffusers logs at warning level or above inside the block (its way of reporting)."""
    logger = logging.getLogger("diffusers")
    handler, level, printing = _Collected(), logger.level, logger.handlers[:]
    logger.handlers = [handler]  # collected instead of printed over the runner's progress lines
    logger.setLevel(logging.WARNING)
    try:
        yield handler.messages
    finally:
        logger.handlers = printing
        logger.setLevel(level)


class DiffusersModelHandle(PeftModelHandle):
    """A diffusers model holding PEFT LoRA layers, driven through the model's own mixin methods."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__(root, peft_wrapped=False)

    def _lora(self) -> bool:
        return bool(self._lora_layers())

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        names = None if adapter_names is None else list(adapter_names)
        self.root.fuse_lora(lora_scale=1.0, safe_fusing=safe, adapter_names=names)

    def unmerge(self) -> None:
        self.root.unfuse_lora()

    def merge_and_unload(self, *, safe: bool = False) -> None:
        self.root.fuse_lora(lora_scale=1.0, safe_fusing=safe)
        self.root.unload_lora()

    def unload(self) -> None:
        self.root.unload_lora()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        self.root.disable_lora()
        try:
            yield
        finally:
            self.root.enable_lora()

    def set_active(self, names: Sequence[str]) -> None:
        self.root.set_adapters(list(names))

    def add_adapter(self, adapter: ModelAdapter) -> None:
        self.root.add_adapter(_config(adapter), adapter_name=adapter.name)
        self.load_factors(adapter)

    def delete_adapter(self, name: str) -> None:
        self.root.delete_adapters(name)

    def add_weighted_adapter(self, names: Sequence[str], weights: Sequence[float], new_name: str) -> None:
        raise Unsupported("diffusers has no add_weighted_adapter")

    def save_adapter(self, directory: Path, name: str) -> None:
        self.root.save_lora_adapter(str(directory), adapter_name=name)

    def saved_tensors(self, directory: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(directory / WEIGHTS_FILE))

    def load_adapter(self, directory: Path, name: str) -> list[str]:
        with _reported() as reports:
            self.root.load_lora_adapter(
                str(directory), prefix=None, adapter_name=name, weight_name=WEIGHTS_FILE
            )
        return reports

    def save_merged(self, directory: Path) -> None:
        if self._lora():
            raise ValueError("the model still holds LoRA layers: fuse_lora and unload_lora first")
        self.root.save_pretrained(str(directory))


class DiffusersModelTarget:
    """diffusers' ``PeftAdapterMixin`` on a tiny ``UNet2DConditionModel`` (the ``unet`` architecture)."""

    name = "diffusers"
    is_model_target = True

    def version(self) -> str:
        return str(_diffusers().__version__)

    def capabilities(self) -> Capabilities:
        d = _diffusers()
        import peft

        v = f"diffusers {d.__version__} (peft {peft.__version__})"
        notes = {
            a: f"{v}: LoRA at model level is diffusers' PeftAdapterMixin, on diffusers models only "
            "(the transformers architectures are the peft target's)"
            for a in ARCHITECTURES
            if a != ARCHITECTURE
        }
        notes["weighted_cat"] = f"{v}: no add_weighted_adapter (set_adapters weights mix at run time only)"
        for option in ("lora_bias", "modules_to_save"):
            notes[option] = f"{v}: not passed through this target's LoRA config yet"
        why = archs.unavailable_notes().get(ARCHITECTURE)
        if why:
            notes[ARCHITECTURE] = why
        return Capabilities(
            layers=frozenset(() if why else {ARCHITECTURE}),
            dtypes=frozenset(DTYPES.values()),
            operations=MODEL_OPERATIONS - {"weighted_cat"},
            options=MODEL_OPTIONS - {"lora_bias", "modules_to_save"},
            notes=notes,
        )

    def build_base(self, spec: ModelSpec) -> DiffusersModelHandle:
        return DiffusersModelHandle(archs.build_base(spec))

    def build(self, spec: ModelSpec) -> DiffusersModelHandle:
        h = self.build_base(spec)
        for a in spec.adapters:
            h.add_adapter(a)
        h.set_active(spec.active_adapters)
        h.root.eval()
        return h

    def load_adapter(
        self, spec: ModelSpec, directory: Path, name: str
    ) -> tuple[DiffusersModelHandle, list[str]]:
        h = self.build_base(spec)
        reports = h.load_adapter(directory, name)
        return h, reports

    def load_merged(self, spec: ModelSpec, directory: Path) -> DiffusersModelHandle:
        return DiffusersModelHandle(archs.from_pretrained(spec, str(directory)))


TARGET = DiffusersModelTarget()
