"""The reference at model level: ``lora_core`` layers swapped into a transformers model.

``lora_core.wrap`` replaces each targeted module; ``lora_core.model`` merges the whole tree (atomic
safe merge, tied weights untied before they are written). When a merge unties a weight, the config's
``tie_word_embeddings`` is cleared too, so a saved merged model is not re-tied on load. Adapters are
saved as ``adapter_config.json`` plus ``adapter.safetensors`` holding only that adapter's factors
(LoRA biases included) and its trained copies of ``modules_to_save`` (``lora_core.ModulesToSave``);
loading refuses keys that do not fit the model and an adapter name that is already loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

import lora_core
from properties.models import architectures as archs
from properties.models.protocol import full_model_capabilities
from properties.models.spec import ModelAdapter, ModelSpec
from properties.models.targets._torch import TorchModelHandle
from properties.targets.protocol import Capabilities, Unsupported

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter.safetensors"


class ReferenceModelHandle(TorchModelHandle):
    def __init__(self, model: nn.Module, spec: ModelSpec) -> None:
        super().__init__(model)
        self.spec = spec
        self.active: list[str] = []

    # -- adapters --------------------------------------------------------------------------------

    def _layers(self) -> dict[str, lora_core.LoraLayer]:
        return lora_core.model.lora_layers(self.root)

    def _wrapped(self, path: str) -> lora_core.LoraLayer:
        m = self.root.get_submodule(path)
        if isinstance(m, lora_core.LoraLayer):
            return m
        layer = lora_core.wrap(m, fan_in_fan_out=archs.is_conv1d(m))
        parent, _, child = path.rpartition(".")
        setattr(self.root.get_submodule(parent) if parent else self.root, child, layer)
        return layer

    def _saved(self) -> dict[str, lora_core.ModulesToSave]:
        return lora_core.model.saved_modules(self.root)

    def _saving(self, path: str) -> lora_core.ModulesToSave:
        m = self.root.get_submodule(path)
        if isinstance(m, lora_core.ModulesToSave):
            return m
        wrapper = lora_core.ModulesToSave(m)
        parent, _, child = path.rpartition(".")
        setattr(self.root.get_submodule(parent) if parent else self.root, child, wrapper)
        return wrapper

    def _names(self) -> set[str]:
        names = {n for layer in self._layers().values() for n in layer.r}
        return names | {n for m in self._saved().values() for n in m.modules_to_save}

    def add_adapter(self, adapter: ModelAdapter) -> None:
        if adapter.name in self._names():
            raise ValueError(f"adapter {adapter.name!r} already exists")
        for path, a in adapter.modules.items():
            layer = self._wrapped(path)
            cfg = lora_core.LoraConfig(
                r=a.r,
                lora_alpha=a.alpha,
                use_rslora=a.use_rslora,
                use_dora=a.use_dora,
                lora_bias=a.bias is not None,
                init_lora_weights=False,
            )
            layer.add_adapter(adapter.name, cfg)
            layer.load_factors(adapter.name, **a.tensors())
        for path, params in adapter.modules_to_save.items():
            self._saving(path).add_adapter(adapter.name, params)
        self.set_active(self.active)  # adding does not activate (as in PEFT)

    def set_active(self, names: Sequence[str]) -> None:
        self.active = list(names)
        for layer in self._layers().values():
            layer.set_adapter([n for n in names if n in layer.r])
        for saved in self._saved().values():
            saved.set_adapter(names)

    def delete_adapter(self, name: str) -> None:
        for layer in self._layers().values():
            if name in layer.r:
                layer.delete_adapter(name)
        for saved in self._saved().values():
            saved.delete_adapter(name)
        self.active = [n for n in self.active if n != name]

    def add_weighted_adapter(self, names: Sequence[str], weights: Sequence[float], new_name: str) -> None:
        """``cat``: ``A`` stacks the ``A_i``; ``B`` stacks the ``w_i s_i B_i``, rounded once; scaling 1."""
        modules = {}
        for path, layer in self._layers().items():
            parts = [(n, w) for n, w in zip(names, weights, strict=True) if n in layer.r]
            if not parts:
                continue
            if any(layer.use_dora[n] for n, _ in parts):
                raise Unsupported("reference: a weighted combination of DoRA adapters is not defined")
            A = torch.cat([layer.lora_A[n].detach() for n, _ in parts], 0)
            B = torch.cat(
                [layer.lora_B[n].detach().to(torch.float64) * (w * layer.scaling[n]) for n, w in parts], 1
            ).to(A.dtype)
            r = A.shape[0]
            spec = lora_core_adapter(new_name, r, A, B)
            modules[path] = spec
        self.add_adapter(ModelAdapter(new_name, modules))

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {}
        for path, layer in self._layers().items():
            if name not in layer.r:
                continue
            for key in ("A", "B", "bias", "magnitude"):
                store = getattr(layer, f"lora_{key}")
                if name in store:
                    out[f"{path}/{key}"] = store[name].detach()
        for path, saved in self._saved().items():
            if name in saved.modules_to_save:
                for key, p in saved.modules_to_save[name].named_parameters():
                    out[f"{path}/saved.{key}"] = p.detach()
        return out

    # -- merging ---------------------------------------------------------------------------------

    def _untied(self, names: list[str]) -> None:
        config = getattr(self.root, "config", None)  # transformers and diffusers models have one
        if names and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        self._untied(lora_core.model.merge(self.root, safe, adapter_names))

    def unmerge(self) -> None:
        lora_core.model.unmerge(self.root)

    def merge_and_unload(self, *, safe: bool = False) -> None:
        self.root, untied = lora_core.model.merge_and_unload(self.root, safe)
        self._untied(untied)

    def unload(self) -> None:
        self.root = lora_core.model.unload(self.root)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        layers = [*self._layers().values(), *self._saved().values()]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def snapshot(self) -> dict[str, object]:
        snap = super().snapshot()
        snap["tie_word_embeddings"] = getattr(getattr(self.root, "config", None), "tie_word_embeddings", None)
        for path, layer in self._layers().items():
            snap[f"{path}:merged"] = list(layer.merged_adapters)
            snap[f"{path}:active"] = list(layer.active_adapters)
            for k, v in layer._caches.items():
                snap[f"{path}:cache:{k}"] = v.clone()
        for path, saved in self._saved().items():
            snap[f"{path}:saved active"] = saved.active_adapter
        return snap

    # -- saving ----------------------------------------------------------------------------------

    def save_adapter(self, directory: Path, name: str) -> None:
        from safetensors.torch import save_file

        layers = {p: lay for p, lay in self._layers().items() if name in lay.r}
        config = {
            "adapter": name,
            "modules": {
                p: {"r": lay.r[name], "lora_alpha": lay.lora_alpha[name]} for p, lay in layers.items()
            },
            "use_rslora": any(lay.use_rslora[name] for lay in layers.values()),
            "use_dora": any(lay.use_dora[name] for lay in layers.values()),
            "lora_bias": any(name in lay.lora_bias for lay in layers.values()),
            "modules_to_save": [p for p, m in self._saved().items() if name in m.modules_to_save],
        }
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        tensors = {k: v.contiguous().clone() for k, v in self.adapter_tensors(name).items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))

    def saved_tensors(self, directory: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(directory / WEIGHTS_FILE))

    def load_adapter(self, directory: Path, name: str) -> list[str]:
        config = json.loads((directory / CONFIG_FILE).read_text())
        tensors = self.saved_tensors(directory)
        if name in self._names():
            raise ValueError(f"adapter {name!r} is already loaded")
        paths = dict(self.root.named_modules())
        saved_paths = config.get("modules_to_save", [])
        bad = [p for p in config["modules"] if p not in paths or archs.layer_kind(_base(paths[p])) is None]
        bad += [p for p in saved_paths if p not in paths]
        expected = {f"{p}/{k}" for p in config["modules"] for k in ("A", "B")}
        optional = {f"{p}/{k}" for p in config["modules"] for k in ("bias", "magnitude")}
        saved_keys = {k for k in tensors if k.partition("/")[0] in saved_paths and "/saved." in k}
        stray = sorted(set(tensors) - expected - optional - saved_keys)
        if bad or stray or not expected <= set(tensors):
            raise ValueError(
                f"adapter keys do not fit this model: modules {bad} not found, unexpected tensors {stray}, "
                f"missing {sorted(expected - set(tensors))}"
            )
        modules = {}
        for path, m in config["modules"].items():
            t = {k: tensors.get(f"{path}/{k}") for k in ("A", "B", "bias", "magnitude")}
            modules[path] = lora_core_adapter(
                name, m["r"], t["A"], t["B"], m["lora_alpha"], config["use_rslora"], t["magnitude"], t["bias"]
            )
        saved = {
            p: {k.partition("/saved.")[2]: v for k, v in tensors.items() if k.startswith(f"{p}/saved.")}
            for p in saved_paths
        }
        self.add_adapter(
            ModelAdapter(
                name,
                modules,
                config["use_rslora"],
                config["use_dora"],
                lora_bias=config.get("lora_bias", False),
                modules_to_save=saved,
            )
        )
        self.set_active([*self.active, name])
        return []

    def save_merged(self, directory: Path) -> None:
        if self._layers() or self._saved():
            raise ValueError("the model still holds LoRA layers: merge_and_unload first")
        archs.save_pretrained(self.spec, self.root, str(directory))


def _base(m: nn.Module) -> nn.Module:
    return m.base_layer if isinstance(m, lora_core.LoraLayer) else m


def lora_core_adapter(name, r, A, B, alpha=None, rslora=False, magnitude=None, bias=None):
    """An :class:`~properties.spec.AdapterSpec` for the factors (alpha = r: scaling 1 by default)."""
    from properties.spec import AdapterSpec

    return AdapterSpec(
        name=name,
        r=int(r),
        alpha=float(r if alpha is None else alpha),
        A=A,
        B=B,
        use_rslora=rslora,
        use_dora=magnitude is not None,
        bias=bias,
        magnitude=magnitude,
    )


class ReferenceModelTarget:
    """``lora_core`` at model level, on the transformers architectures of the model half."""

    name = "reference"
    is_model_target = True

    def version(self) -> str:
        return lora_core.__version__

    def capabilities(self) -> Capabilities:
        return full_model_capabilities()

    def build_base(self, spec: ModelSpec) -> ReferenceModelHandle:
        return ReferenceModelHandle(archs.build_base(spec), spec)

    def build(self, spec: ModelSpec) -> ReferenceModelHandle:
        h = self.build_base(spec)
        for a in spec.adapters:
            h.add_adapter(a)
        h.set_active(spec.active_adapters)
        return h

    def load_adapter(self, spec: ModelSpec, directory: Path, name: str):
        h = self.build_base(spec)
        return h, h.load_adapter(directory, name)

    def load_merged(self, spec: ModelSpec, directory: Path) -> ReferenceModelHandle:
        model = archs.from_pretrained(spec, str(directory))
        return ReferenceModelHandle(model.eval(), spec)


TARGET = ReferenceModelTarget()
