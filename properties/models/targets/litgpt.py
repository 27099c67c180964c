"""litgpt (0.5.13) at model level: ``litgpt.lora.GPT`` with a tiny ``Config`` (the ``litgpt``
architecture), driven the way litgpt's own scripts drive it.

==================  =============================================================================
protocol            litgpt
==================  =============================================================================
build               ``GPT(Config(..., lora_r, lora_alpha, lora_projection, lora_mlp, lora_head))``;
                    the base checkpoint and the LoRA weights loaded as ``litgpt merge_lora`` loads
                    them (``pretrained.update(lora); model.load_state_dict(..., assign=True)``)
merge               ``merge_lora_weights(model)`` (in place; each ``LoRALinear`` merges once)
merge_and_unload    ``merge_lora_weights``, then ``litgpt merge_lora``'s export: the state dict without
                    ``lora_filter`` keys and with ``"linear."`` removed, loaded into the base ``GPT``
save_adapter        ``torch.save`` of the ``lora_filter`` state dict as ``lit_model.pth.lora`` (what
                    ``litgpt finetune lora`` saves)
save_merged         ``lit_model.pth`` (``torch.save``) / the base ``GPT`` + ``load_state_dict``
==================  =============================================================================

litgpt lacks unmerge, unload, disabling an adapter, a safe merge, more than one adapter, rsLoRA and
DoRA; those cells are skipped with the reason. One rank and alpha hold for the whole model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from properties.models import architectures as archs
from properties.models import litgpt_gpt as lg
from properties.models.spec import ARCHITECTURES, ModelAdapter, ModelSpec
from properties.models.targets._torch import TorchModelHandle
from properties.spec import DTYPES
from properties.targets._library import distribution_version
from properties.targets.litgpt_target import _lora
from properties.targets.protocol import Capabilities, Unsupported

ADAPTER_FILE, CONFIG_FILE = "lit_model.pth.lora", "lora_config.json"


def _settings(adapter: ModelAdapter, config: dict[str, Any]) -> dict[str, Any]:
    groups = sorted({lg.group_of(p) for p in adapter.modules})
    if None in groups:
        raise Unsupported(f"litgpt has no LoRA for {[p for p in adapter.modules if not lg.group_of(p)]}")
    n = len(lg.qkv_blocks(config))
    # the fused qkv's canonical LoRA has rank n*r and alpha n*alpha (lora_structure): litgpt's r, alpha
    pairs = {
        (a.r // n, a.alpha / n) if p.endswith(".attn.qkv") else (a.r, a.alpha)
        for p, a in adapter.modules.items()
    }
    if len(pairs) != 1:
        raise Unsupported("litgpt has one lora_r and lora_alpha per model")
    ((r, alpha),) = pairs
    if adapter.use_rslora or adapter.use_dora:
        raise Unsupported("litgpt has no rsLoRA and no DoRA")
    return {"groups": groups, "rank": r, "alpha": alpha}


def _qkv_stored(config: dict[str, Any], B: torch.Tensor, r: int) -> torch.Tensor:
    """litgpt's ``lora_B`` of the fused qkv: each enabled block's rows of its own ``r`` columns."""
    return torch.cat([B[lo:hi, j * r : (j + 1) * r] for j, (lo, hi) in enumerate(lg.qkv_blocks(config))])


def _qkv_canonical(config: dict[str, Any], stored: torch.Tensor, r: int, out_features: int) -> torch.Tensor:
    """The block-diagonal canonical ``B`` (``out x n*r``) of a stored qkv ``lora_B``."""
    blocks = lg.qkv_blocks(config)
    B = stored.new_zeros(out_features, len(blocks) * r)
    row = 0
    for j, (lo, hi) in enumerate(blocks):
        B[lo:hi, j * r : (j + 1) * r] = stored[row : row + hi - lo]
        row += hi - lo
    return B


class _Merged(nn.Module):
    """A LoRA module seen as a merged layer: its forward, and its plain ``linear`` as ``base_layer``."""

    def __init__(self, lora: nn.Module) -> None:
        super().__init__()
        self.lora = lora
        self.base_layer = lora.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora(x)


class LitgptModelHandle(TorchModelHandle):
    wrapper_segments = ("linear",)  # LoRALinear holds the base layer as ``.linear``

    def __init__(self, root: nn.Module, spec: ModelSpec, settings: dict[str, Any] | None) -> None:
        super().__init__(root)
        self.spec = spec
        self.settings = settings  # None for a plain (base or exported) GPT

    def hooked(self, path: str) -> nn.Module:
        return super().module(path)

    def module(self, path: str) -> nn.Module:
        m = super().module(path)
        return _Merged(m) if hasattr(m, "linear") else m

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {}
        for path, m in self.root.named_modules():
            if getattr(m, "r", 0) > 0 and hasattr(m, "lora_A"):
                out[f"{path}/A"] = m.lora_A.detach()
                B = m.lora_B.detach()
                if path.endswith(".attn.qkv"):
                    B = _qkv_canonical(self.spec.config, B, m.r, m.linear.out_features)
                out[f"{path}/B"] = B
        return out

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        if safe:
            raise Unsupported("litgpt's merge has no finiteness check")
        lg_lora = _lora()
        lg_lora.merge_lora_weights(self.root)

    def merge_and_unload(self, *, safe: bool = False) -> None:
        if self.settings is None:
            raise ValueError("not a LoRA model")
        self.merge(safe=safe)
        state = {
            k.replace("linear.", ""): v
            for k, v in self.root.state_dict().items()
            if not _lora().lora_filter(k, v)
        }
        with torch.device(self.spec.device):
            base = lg.construct(self.spec.config, self.spec.dtype)
        base.load_state_dict(state, strict=True)
        self.root, self.settings = base.eval(), None

    def save_adapter(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        lora_filter = _lora().lora_filter
        torch.save(
            {k: v for k, v in self.root.state_dict().items() if lora_filter(k, v)}, directory / ADAPTER_FILE
        )
        (directory / CONFIG_FILE).write_text(json.dumps(self.settings))

    def saved_tensors(self, directory: Path) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors, the fused qkv's ``lora_B`` re-laid out block-diagonally (the same
        numbers plus the structural zeros of the canonical form, so it compares with the adapter)."""
        saved = torch.load(directory / ADAPTER_FILE, weights_only=True)
        settings = json.loads((directory / CONFIG_FILE).read_text())
        for key, value in saved.items():
            if key.endswith(".attn.qkv.lora_B"):
                out_f = self.root.get_submodule(key.removesuffix(".lora_B")).linear.out_features
                saved[key] = _qkv_canonical(self.spec.config, value, settings["rank"], out_f)
        return saved

    def load_adapter(self, directory: Path, name: str) -> list[str]:
        """``litgpt merge_lora``'s load: this model's weights updated with the LoRA checkpoint, strict."""
        state = self.root.state_dict()
        state.update(self.saved_tensors(directory))
        self.root.load_state_dict(state, strict=True)
        return []

    def save_merged(self, directory: Path) -> None:
        if self.settings is not None:
            raise ValueError("still a LoRA model: merge and export first")
        lg.save_pretrained(self.root, self.spec.config, str(directory))

    # -- what litgpt does not have ----------------------------------------------------------------

    def unmerge(self) -> None:
        raise Unsupported("litgpt has no unmerge")

    def unload(self) -> None:
        raise Unsupported("litgpt has no unload")

    def set_active(self, names: Sequence[str]) -> None:
        raise Unsupported("litgpt has one adapter per model")

    def add_adapter(self, adapter: ModelAdapter) -> None:
        raise Unsupported("litgpt has one adapter per model")

    def delete_adapter(self, name: str) -> None:
        raise Unsupported("litgpt has one adapter per model")

    def add_weighted_adapter(self, names: Sequence[str], weights: Sequence[float], new_name: str) -> None:
        raise Unsupported("litgpt has no weighted combination of adapters")


class LitgptModelTarget:
    """litgpt's ``lora.GPT`` on the ``litgpt`` architecture."""

    name = "litgpt"
    is_model_target = True

    def version(self) -> str:
        _lora()
        return distribution_version("litgpt")

    def capabilities(self) -> Capabilities:
        _lora()
        v = f"litgpt {distribution_version('litgpt')}"
        lacks = {
            "unmerge": "no unmerge",
            "unload": "no unload and no way to disable an adapter",
            "disable": "no way to disable an adapter",
            "safe_merge": "merge_lora_weights has no finiteness check",
            "set_active": "one adapter per model",
            "add_adapter": "one adapter per model",
            "delete_adapter": "one adapter per model",
            "weighted_cat": "no weighted combination of adapters",
            "multi_adapter": "one adapter per model",
            "rslora": "scaling is lora_alpha / lora_r only",
            "dora": "no DoRA",
        }
        notes = {k: f"{v}: {why}" for k, why in lacks.items()}
        notes.update(
            {a: f"{v}: its models are its own (litgpt)" for a in ARCHITECTURES if a != lg.ARCHITECTURE}
        )
        why = archs.unavailable_notes().get(lg.ARCHITECTURE)
        if why:
            notes[lg.ARCHITECTURE] = why
        return Capabilities(
            layers=frozenset(() if why else {lg.ARCHITECTURE}),
            dtypes=frozenset(DTYPES.values()),
            operations=frozenset({"merge", "merge_and_unload", "save_adapter", "save_merged"}),
            options=frozenset(),
            notes=notes,
        )

    def build_base(self, spec: ModelSpec) -> LitgptModelHandle:
        return LitgptModelHandle(archs.build_base(spec), spec, None)

    def _lora_model(
        self, spec: ModelSpec, settings: dict[str, Any], lora: dict[str, torch.Tensor]
    ) -> nn.Module:
        with torch.device(spec.device):
            model = lg.construct_lora(
                spec.config, spec.dtype, set(settings["groups"]), settings["rank"], settings["alpha"]
            )
        checkpoint = dict(spec.base)
        checkpoint.update(lora)
        model.load_state_dict(checkpoint, strict=True)
        return model.eval()

    def build(self, spec: ModelSpec) -> LitgptModelHandle:
        if len(spec.adapters) != 1:
            raise Unsupported("litgpt has one adapter per model")
        adapter = spec.adapters[0]
        settings = _settings(adapter, spec.config)
        lora = {}
        for path, a in adapter.modules.items():
            lora[f"{path}.lora_A"] = a.A
            qkv = path.endswith(".attn.qkv")
            lora[f"{path}.lora_B"] = _qkv_stored(spec.config, a.B, settings["rank"]) if qkv else a.B
        return LitgptModelHandle(self._lora_model(spec, settings, lora), spec, settings)

    def load_adapter(
        self, spec: ModelSpec, directory: Path, name: str
    ) -> tuple[LitgptModelHandle, list[str]]:
        settings = json.loads((directory / CONFIG_FILE).read_text())
        lora = torch.load(directory / ADAPTER_FILE, weights_only=True)
        return LitgptModelHandle(self._lora_model(spec, settings, lora), spec, settings), []

    def load_merged(self, spec: ModelSpec, directory: Path) -> LitgptModelHandle:
        with torch.device(spec.device):
            return LitgptModelHandle(lg.from_pretrained(str(directory), spec.dtype).eval(), spec, None)


TARGET = LitgptModelTarget()
