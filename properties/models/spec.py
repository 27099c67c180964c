"""What a model property hands to a model target: an architecture, its exact base weights, and the
adapters to load on named modules.

A :class:`ModelSpec` is library-neutral: the architecture is named (``llama_tied``, ``llama``,
``gpt2``, ``bert``) and its config is a plain dict; ``base`` holds every base parameter by the
transformers state-dict name, already rounded to ``dtype`` (tied parameters appear once, under the
name that owns the storage). Each adapter is a :class:`ModelAdapter`: per targeted module path, an
:class:`~properties.spec.AdapterSpec` in the layer half's canonical layout (``(out, in)`` for linear
and GPT-2 Conv1D alike), so the layer half's oracle and precision model apply to every module as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from properties.spec import AdapterSpec, NamedAdapters, dtype_name

Architecture = Literal[
    "llama_tied", "llama", "gpt2", "bert", "unet", "torchtune_llama", "litgpt", "keras_llama"
]
ARCHITECTURES: tuple[Architecture, ...] = (
    "llama_tied",
    "llama",
    "gpt2",
    "bert",
    "unet",  # diffusers UNet2DConditionModel (properties/models/unet.py)
    "torchtune_llama",  # torchtune llama3 builders (properties/models/torchtune_llama.py)
    "litgpt",  # litgpt GPT (properties/models/litgpt_gpt.py)
    "keras_llama",  # keras-hub LlamaBackbone, Keras 3 torch backend (properties/models/keras_llama.py)
)
TIED_ARCHITECTURES: tuple[Architecture, ...] = ("llama_tied", "gpt2")


@dataclass(frozen=True, eq=False)
class ModelAdapter:
    """One named adapter over a model: a LoRA per targeted module path (ranks and alphas per module).

    ``lora_bias``: every targeted module's LoRA carries a bias (``AdapterSpec.bias``; PEFT's
    ``lora_bias=True``), added scaled to the base bias. ``modules_to_save``: whole modules the adapter
    trains and saves (PEFT's ``modules_to_save``), by module path: the trained copy's parameters under
    the module's own parameter names, in the module's own layout (a GPT-2 ``Conv1D`` weight is ``(in,
    out)``). While the adapter is active the trained copy replaces the module; disabled or unloaded, the
    original is back; ``merge_and_unload`` keeps the trained copy. They never overlap a LoRA target."""

    name: str
    modules: dict[str, AdapterSpec]  # module path -> factors (canonical layout, rounded to the dtype)
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    modules_to_save: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self.modules)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor, keyed ``path/A``, ``path/B``, ``path/bias``, ``path/magnitude`` and, for a
        module to save, ``path/saved.<parameter>``."""
        out = {f"{p}/{k}": v for p, a in self.modules.items() for k, v in a.tensors().items()}
        out.update(saved_tensors(self.modules_to_save))
        return out


def saved_tensors(modules_to_save: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Trained copies keyed ``path/saved.<parameter>`` (the key every model handle reports them under)."""
    return {f"{p}/saved.{k}": v for p, params in modules_to_save.items() for k, v in params.items()}


@dataclass(frozen=True)
class Hostile:
    """A non-finite or overflowing entry planted in one adapter of one module (safe-merge property)."""

    kind: str  # nan | inf | -inf | overflow
    adapter: str
    path: str
    tensor: str  # A or B
    position: int


@dataclass(frozen=True, eq=False)
class ModelSpec(NamedAdapters):
    """A base model plus its adapters, everything exact. Model targets build from this and nothing else."""

    architecture: Architecture
    config: dict[str, object]
    dtype: torch.dtype
    base: dict[str, torch.Tensor]  # state-dict name -> exact tensor (tied twins appear once)
    adapters: tuple[ModelAdapter, ...]
    tied: tuple[tuple[str, str], ...] = ()  # (module path, twin module path) sharing one weight
    device: str = "cpu"
    seed: int = 0
    active: tuple[str, ...] = field(default=())  # active adapters; empty means all, in order

    @property
    def targeted(self) -> tuple[str, ...]:
        """Every module path some adapter targets, in model order of first appearance."""
        return tuple(dict.fromkeys(p for a in self.adapters for p in a.modules))

    def saved_module(self, path: str) -> dict[str, torch.Tensor] | None:
        """The trained copy in force at ``path``: that of the first active adapter saving the module."""
        for n in self.active_adapters:
            copy = self.adapter(n).modules_to_save.get(path)
            if copy is not None:
                return copy
        return None

    @property
    def saved_paths(self) -> tuple[str, ...]:
        """Every module path some adapter saves a trained copy of (``modules_to_save``)."""
        return tuple(dict.fromkeys(p for a in self.adapters for p in a.modules_to_save))

    def twin(self, path: str) -> str | None:
        """The module tied to ``path`` (embedding <-> lm_head), if any."""
        for a, b in self.tied:
            if path == a:
                return b
            if path == b:
                return a
        return None

    @property
    def options(self) -> frozenset[str]:
        opts: set[str] = set()
        if len(self.adapters) > 1:
            opts.add("multi_adapter")
        for a in self.adapters:
            flags = (
                ("rslora", a.use_rslora),
                ("dora", a.use_dora),
                ("lora_bias", a.lora_bias),
                ("modules_to_save", bool(a.modules_to_save)),
            )
            opts |= {o for o, on in flags if on}
        return frozenset(opts)


@dataclass(frozen=True, eq=False)
class ModelExample:
    """A spec plus the batch it is run on: token ids and an attention mask (0 = padding)."""

    spec: ModelSpec
    input_ids: torch.Tensor  # (batch, seq) int64
    attention_mask: torch.Tensor  # (batch, seq) int64, 1 = attend
    extra: ModelAdapter | None = None  # a further adapter to add (isolation), same modules or not
    hostile: Hostile | None = None  # safe merge: the entry planted in ``spec`` (``clean`` is without)
    clean: ModelSpec | None = None
    inputs: dict[str, torch.Tensor] | None = None  # the forward's inputs where they are not tokens (UNet)

    @property
    def batch(self) -> dict[str, torch.Tensor]:
        if self.inputs is not None:
            return self.inputs
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def describe(self) -> str:
        s = self.spec
        cfg = " ".join(f"{k}={v}" for k, v in s.config.items())
        lines = [
            f"architecture={s.architecture} dtype={dtype_name(s.dtype)} seed={s.seed}",
            f"config: {cfg}",
        ]
        if self.inputs is not None:
            lines.append(" ".join(f"{k}={_shown(v)}" for k, v in self.inputs.items()))
        else:
            lines.append(
                f"input_ids={tuple(self.input_ids.shape)} padding={int((self.attention_mask == 0).sum())} "
                f"mask={self.attention_mask.tolist()}"
            )
        for a in (*s.adapters, *([self.extra] if self.extra else [])):
            mods = ", ".join(f"{p}(r={m.r}, alpha={m.alpha:g})" for p, m in a.modules.items())
            extra = " (added later)" if a is self.extra else ""
            flags = f"rslora={a.use_rslora} dora={a.use_dora}" + (" lora_bias=True" if a.lora_bias else "")
            lines.append(f"adapter {a.name!r}{extra}: {flags} on {mods}")
            if a.modules_to_save:
                lines.append(f"  modules_to_save: {', '.join(a.modules_to_save)}")
        if s.active:
            lines.append(f"active={list(s.active)}")
        if self.hostile:
            lines.append(f"hostile: {self.hostile}")
        return "\n".join(lines)


def _shown(t: torch.Tensor) -> str:
    """A tensor input in a description: its value if it is a scalar, else its shape."""
    return str(t.item()) if t.dim() == 0 else str(tuple(t.shape))
