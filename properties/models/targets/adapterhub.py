"""adapter-hub ``adapters`` (LoRA) at model level: ``adapters.init(model)``, ``add_adapter(name,
config=LoRAConfig(...))``, ``set_active_adapters``, ``merge_adapter`` / ``reset_adapter``,
``delete_adapter``, ``save_adapter`` / ``load_adapter``.

What the library can express decides what is drawn (``ModelCapabilities``):

- **Where a LoRA can go.** ``adapters`` wraps fixed modules per architecture and selects them by
  *location* (``selfattn_lora`` with ``attn_matrices`` q/k/v, ``intermediate_lora``, ``output_lora``)
  and by layer (``leave_out``). One adapter therefore targets whole kinds × layers: a drawn subset is
  grown to that product (``closure``). Llama: q/k/v, ``mlp.down_proj`` (its "intermediate") and
  ``mlp.up_proj`` ("output"); BERT: query/key/value, ``intermediate.dense``, ``output.dense``; GPT-2:
  ``mlp.c_fc`` and ``mlp.c_proj`` (its fused ``c_attn`` gets one LoRA per q/k/v slice, which is not a
  LoRA on the module, so it is not drawn). Embeddings and ``lm_head`` cannot be adapted.
- **One r and alpha per adapter** (``LoRAConfig(r, alpha)``, scaling ``alpha / r``; no rsLoRA).
- **One active LoRA at a time.** Several active adapters are composed (``Stack`` feeds one LoRA's output
  into the next), not summed, so ``multi_adapter`` is not declared; switching adapters is.
- **No unload, no safe merge, no merged-model export**: ``merge_adapter`` merges in place and the LoRA
  modules stay (``model_merge_unmerge`` is the merge property that applies).

The factors are created in the model's dtype (``LoRAConfig(dtype=...)``); by default ``adapters`` makes
them float32 whatever the model's dtype.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from properties.models import architectures as archs
from properties.models.protocol import ModelCapabilities
from properties.models.spec import ModelAdapter, ModelSpec
from properties.models.targets._torch import TorchModelHandle
from properties.spec import DTYPES, dtype_name
from properties.targets.protocol import Unsupported

# Per architecture: the layer prefix and, per adaptable module suffix, its location and attention key.
_LAYER = {
    "llama": "model.layers.",
    "llama_tied": "model.layers.",
    "gpt2": "transformer.h.",
    "bert": "encoder.layer.",
}
_SITES: dict[str, dict[str, tuple[str, str | None]]] = {
    "llama": {
        "self_attn.q_proj": ("selfattn", "q"),
        "self_attn.k_proj": ("selfattn", "k"),
        "self_attn.v_proj": ("selfattn", "v"),
        "mlp.down_proj": ("intermediate", None),
        "mlp.up_proj": ("output", None),
    },
    "gpt2": {"mlp.c_fc": ("intermediate", None), "mlp.c_proj": ("output", None)},
    "bert": {
        "attention.self.query": ("selfattn", "q"),
        "attention.self.key": ("selfattn", "k"),
        "attention.self.value": ("selfattn", "v"),
        "intermediate.dense": ("intermediate", None),
        "output.dense": ("output", None),
    },
}
_SITES["llama_tied"] = _SITES["llama"]
_ADDED_BY_INIT = ("prompt_tuning.", "heads.", "shared_parameters.", "invertible_adapters.")
OPERATIONS = frozenset({"merge", "unmerge", "set_active", "add_adapter", "delete_adapter", "save_adapter"})


class AdaptersMissing(ImportError):
    pass


def _adapters() -> Any:
    from properties.targets._library import import_or_raise

    adapters = import_or_raise(
        "adapters",
        AdaptersMissing,
        "the adapters target needs adapter-hub `adapters` (it pins transformers 4.57): "
        "python scripts/envs.py create adapters",
    )
    logging.getLogger("adapters").setLevel(logging.ERROR)
    return adapters


def _missing() -> str | None:
    """Why ``adapters`` cannot be used here, or None (its lazy module has no ``__spec__``: import it)."""
    try:
        _adapters()
    except ImportError as e:
        return str(e)
    return None


def _site(arch: str, path: str) -> tuple[int, str] | None:
    """(layer index, module suffix) of an adaptable path, or None."""
    m = re.fullmatch(re.escape(_LAYER[arch]) + r"(\d+)\.(.+)", path)
    if m is None or m.group(2) not in _SITES[arch]:
        return None
    return int(m.group(1)), m.group(2)


def targetable(arch: str, paths: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p for p in paths if _site(arch, p) is not None)


def closure(arch: str, chosen: list[str]) -> list[str]:
    """Every kind chosen in every layer chosen: what one ``LoRAConfig`` selects."""
    sites = [_site(arch, p) for p in chosen]
    layers = sorted({s[0] for s in sites if s})
    kinds = {s[1] for s in sites if s}
    return [f"{_LAYER[arch]}{i}.{k}" for i in layers for k in _SITES[arch] if k in kinds]


def lora_config(spec: ModelSpec, adapter: ModelAdapter) -> Any:
    """The ``LoRAConfig`` selecting exactly ``adapter``'s modules (see :func:`closure`)."""
    arch = spec.architecture
    sites = [_site(arch, p) for p in adapter.modules]
    if any(s is None for s in sites) or sorted(closure(arch, list(adapter.modules))) != sorted(
        adapter.modules
    ):
        raise Unsupported(f"adapters cannot target exactly {sorted(adapter.modules)}")
    first = next(iter(adapter.modules.values()))
    if any(a.r != first.r or a.alpha != first.alpha for a in adapter.modules.values()):
        raise Unsupported("adapters has one r and alpha per adapter")
    if adapter.use_rslora or adapter.lora_bias or adapter.modules_to_save:
        raise Unsupported("adapters' LoRAConfig has no rsLoRA, LoRA bias or modules_to_save")
    locations = {_SITES[arch][s[1]] for s in sites}
    n_layers = int(spec.config.get("num_hidden_layers", spec.config.get("n_layer", 0)))
    used = {s[0] for s in sites}
    return _adapters().LoRAConfig(
        r=first.r,
        alpha=first.alpha,
        selfattn_lora=any(loc == "selfattn" for loc, _ in locations),
        attn_matrices=sorted(k for loc, k in locations if loc == "selfattn"),
        intermediate_lora=any(loc == "intermediate" for loc, _ in locations),
        output_lora=any(loc == "output" for loc, _ in locations),
        leave_out=[i for i in range(n_layers) if i not in used],
        use_dora=adapter.use_dora,
        dtype=dtype_name(spec.dtype),
        init_weights="bert",  # random factors; the spec's are written over them
    )


class _Canonical(nn.Module):
    """A LoRA-wrapped GPT-2 ``Conv1D`` for the checks: forward as the module, weight ``(out, in)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module

    @property
    def weight(self) -> torch.Tensor:
        w = self.inner.weight
        return w.T if getattr(self.inner, "fan_in_fan_out", False) else w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.inner.bias

    def forward(self, x):
        return self.inner(x)


class AdaptersModelHandle(TorchModelHandle):
    wrapper_segments = ()  # adapters' LoRA layers keep the base weight and bias on the module itself

    def __init__(self, model: nn.Module, spec: ModelSpec) -> None:
        super().__init__(model)
        self.spec = spec

    def base_parameters(self) -> dict[str, torch.Tensor]:
        """The transformers model's parameters, without the aliases ``adapters.init`` adds (its prompt
        tuning layer holds the input embeddings under ``prompt_tuning.base_model_embeddings``)."""
        out = super().base_parameters()
        return {k: v for k, v in out.items() if not k.startswith(_ADDED_BY_INIT) and ".loras." not in k}

    def module(self, path: str) -> nn.Module:
        m = super().module(path)
        return _Canonical(m) if getattr(m, "fan_in_fan_out", False) else m

    def _lora_layers(self) -> dict[str, nn.Module]:
        return {
            n: m for n, m in self.root.named_modules() if hasattr(m, "loras") and hasattr(m, "merge_adapter")
        }

    def load_factors(self, adapter: ModelAdapter) -> None:
        layers = self._lora_layers()
        with torch.no_grad():
            for path, a in adapter.modules.items():
                lora = layers[path].loras[adapter.name]
                lora.lora_A.copy_(a.A)
                lora.lora_B.copy_(a.B)
                if a.magnitude is not None:
                    lora.m.weight.copy_(a.magnitude.reshape(lora.m.weight.shape))

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {}
        for path, layer in self._lora_layers().items():
            if name in layer.loras:
                lora = layer.loras[name]
                out[f"{path}/A"], out[f"{path}/B"] = lora.lora_A.detach(), lora.lora_B.detach()
                if getattr(lora, "use_dora", False):
                    out[f"{path}/magnitude"] = lora.m.weight.detach().reshape(-1)
        return out

    def snapshot(self) -> dict[str, object]:
        snap = super().snapshot()
        for path, layer in self._lora_layers().items():
            snap[f"{path}:merged"] = layer.merged
        snap["active"] = str(self.root.active_adapters)
        return snap

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        if safe:
            raise Unsupported("adapters has no safe merge")
        names = list(adapter_names) if adapter_names is not None else self._active()
        if len(names) != 1:
            raise Unsupported("adapters merges one LoRA at a time (merge_adapter(name))")
        self.root.merge_adapter(names[0])

    def _active(self) -> list[str]:
        setup = self.root.active_adapters
        return [] if setup is None else list(setup.flatten())

    def unmerge(self) -> None:
        self.root.reset_adapter()

    def set_active(self, names: Sequence[str]) -> None:
        if len(names) > 1:
            raise Unsupported("adapters stacks several active LoRAs instead of adding them")
        self.root.set_active_adapters(names[0] if names else None)

    def add_adapter(self, adapter: ModelAdapter) -> None:
        self.root.add_adapter(adapter.name, config=lora_config(self.spec, adapter))
        self.load_factors(adapter)

    def delete_adapter(self, name: str) -> None:
        self.root.delete_adapter(name)

    def save_adapter(self, directory: Path, name: str) -> None:
        self.root.save_adapter(str(directory), name)

    def saved_tensors(self, directory: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(directory.rglob("*.bin")):
            out.update({f"{f.name}/{k}": v for k, v in torch.load(f, weights_only=True).items()})
        for f in sorted(directory.rglob("*.safetensors")):
            from safetensors.torch import load_file

            out.update({f"{f.name}/{k}": v for k, v in load_file(str(f)).items()})
        return out

    def load_adapter(self, directory: Path, name: str) -> list[str]:
        with _reported() as reports:
            info: dict[str, list] = {}
            self.root.load_adapter(str(directory), load_as=name, set_active=True, loading_info=info)
            reports.extend(f"{k}: {v}" for k, v in info.items() if v)
        return reports


@contextmanager
def _reported():
    """What ``adapters`` logs and warns while loading (a report for the properties to judge)."""
    import warnings

    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger, handler = logging.getLogger("adapters"), Keep(logging.WARNING)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class AdaptersModelTarget:
    """adapter-hub ``adapters`` (installed release) on the transformers architectures it supports."""

    name = "adapters"
    is_model_target = True

    def version(self) -> str:
        return str(_adapters().__version__)

    def capabilities(self) -> ModelCapabilities:
        why = archs.missing() or _missing()
        arch_names = tuple(_SITES)
        return ModelCapabilities(
            layers=frozenset(() if why else arch_names),
            dtypes=frozenset(DTYPES.values()),
            operations=OPERATIONS,
            options=frozenset({"dora"}),
            notes={a: why for a in arch_names} if why else {},
            targetable=targetable,
            closure=closure,
            uniform_rank=True,
        )

    def _init(self, spec: ModelSpec) -> nn.Module:
        model = archs.build_base(spec)
        _adapters().init(model)
        return model.eval()

    def build_base(self, spec: ModelSpec) -> AdaptersModelHandle:
        return AdaptersModelHandle(self._init(spec), spec)

    def build(self, spec: ModelSpec) -> AdaptersModelHandle:
        h = self.build_base(spec)
        for a in spec.adapters:
            h.add_adapter(a)
        h.set_active(spec.active_adapters)
        h.root.eval()
        return h

    def load_adapter(self, spec: ModelSpec, directory: Path, name: str):
        h = self.build_base(spec)
        return h, h.load_adapter(directory, name)

    def load_merged(self, spec: ModelSpec, directory: Path):
        raise Unsupported("adapters has no merged-model export (merge_adapter keeps the LoRA modules)")


TARGET = AdaptersModelTarget()
