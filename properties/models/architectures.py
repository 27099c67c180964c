"""The architectures of the model half, built in memory from configs with transformers (nothing is
downloaded), and what the suite needs to know about them: which modules LoRA may target, which are
tied, and what a forward returns.

Every target that adapts a transformers model builds its base here, from the spec's exact tensors,
with ``Model._from_config(config, dtype=...)`` — the path ``from_pretrained`` takes too, so a reloaded
model and a built one hold the same buffers (``.to(dtype)`` would also round RoPE's ``inv_freq``).
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
from types import ModuleType
from typing import Any

import torch
from torch import nn

from properties.models.spec import Architecture, ModelSpec
from properties.targets.protocol import Unsupported

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (embedding, output head) pairs that share one weight when ``tie_word_embeddings`` is on.
TIES: dict[str, tuple[tuple[str, str], ...]] = {
    "llama_tied": (("model.embed_tokens", "lm_head"),),
    "llama": (),
    "gpt2": (("transformer.wte", "lm_head"),),
    "bert": (),
    "unet": (),
    "torchtune_llama": (),
    "litgpt": (),
    "keras_llama": (),
}

# Architectures that are not transformers models: the module that builds, feeds and loads each one
# (``construct``, ``draw_config``, ``draw_inputs``, ``deep_paths``, ``fewer_layers``,
# ``save_pretrained``, ``from_pretrained``, ``missing``; optionally ``capabilities(caps)`` where the
# library states LoRA per kind of module (see :func:`drawable`), ``lora_structure`` where its LoRA on
# a module has a fixed zero pattern, ``lora_fill`` where it repeats one block of ``B``, and
# ``layout`` / ``saveable`` where the model is not a torch module tree to read them from, as Keras's;
# see ``properties/models/unet.py`` and ``properties/models/keras_llama.py``).
FAMILIES: dict[str, str] = {
    "unet": "properties.models.unet",
    "torchtune_llama": "properties.models.torchtune_llama",
    "litgpt": "properties.models.litgpt_gpt",
    "keras_llama": "properties.models.keras_llama",
}


def family(arch: str) -> ModuleType | None:
    """The module describing a non-transformers architecture, or None for a transformers one."""
    path = FAMILIES.get(arch)
    return importlib.import_module(path) if path else None


def drawable(caps: Any, arch: str) -> Any:
    """What the strategies may draw on ``arch`` for a target with ``caps``: the target's own rules
    (``ModelCapabilities``) and, on an architecture whose library configures LoRA per kind of module,
    that library's rule too, stated in the same fields by the family's ``capabilities(caps)``."""
    narrow = getattr(family(arch), "capabilities", None)
    return caps if narrow is None else narrow(caps)


def missing() -> str | None:
    """Why the model half cannot run here (transformers is not installed), or None."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return "the model half needs transformers: pip install 'lora-conformance[peft]'"
    return None


def unavailable_notes() -> dict[str, str]:
    """Capability notes that skip an architecture, with the reason, where its library is missing:
    transformers for the transformers architectures, each other family's own library (diffusers for
    the UNet, torchtune for its Llama)."""
    from properties.models.spec import ARCHITECTURES

    why = missing()
    notes = {}
    for a in ARCHITECTURES:
        fam = family(a)
        reason = fam.missing() if fam is not None else why
        if reason:
            notes[a] = reason
    return notes


def construct(arch: Architecture, fields: dict[str, object], dtype: torch.dtype) -> nn.Module:
    """A fresh model of ``arch`` from its config fields, under the current device context."""
    fam = family(arch)
    if fam is not None:
        return fam.construct(fields, dtype)
    return model_class(arch)._from_config(make_config(arch, fields), **dtype_kw(dtype))


def dtype_kw(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers 5 calls it ``dtype``; 4.x ``torch_dtype`` (the suite is tested with 5.24)."""
    major = int(transformers().__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


@functools.cache
def transformers() -> Any:
    """Import transformers once, with its progress bars and advisory logging silenced."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    return tf


def model_class(arch: Architecture) -> type[nn.Module]:
    tf = transformers()
    return {
        "llama_tied": tf.LlamaForCausalLM,
        "llama": tf.LlamaForCausalLM,
        "gpt2": tf.GPT2LMHeadModel,
        "bert": tf.BertModel,
    }[arch]


def make_config(arch: Architecture, fields: dict[str, object]) -> Any:
    tf = transformers()
    cls = {
        "llama_tied": tf.LlamaConfig,
        "llama": tf.LlamaConfig,
        "gpt2": tf.GPT2Config,
        "bert": tf.BertConfig,
    }[arch]
    return cls(**fields)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer storing its weight ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


_CONV_KINDS = ((nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Conv3d, "conv3d"))


def layer_kind(module: nn.Module) -> str | None:
    """The layer half's kind of a targetable module, or None (norms, containers, ...)."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    for cls, kind in _CONV_KINDS:
        if isinstance(module, cls):
            return kind
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return "linear"
    return None


def targetable(model: nn.Module) -> list[str]:
    """Module paths LoRA may target, in model order: every linear, GPT-2 Conv1D, conv and embedding."""
    return [name for name, m in model.named_modules() if name and layer_kind(m) is not None]


def build_base(spec: ModelSpec) -> nn.Module:
    """The base model of ``spec`` in eval mode, holding exactly ``spec.base``; tied twins share storage.

    A copy of a cached prototype: constructing a transformers model runs its weight initialisation
    (most of an example's time), and every parameter is overwritten from the spec anyway."""
    key = (spec.architecture, tuple(sorted(spec.config.items())), spec.dtype, spec.device)
    why = cannot_run(*key)
    if why is not None:
        raise Unsupported(why)
    model = copy.deepcopy(_prototype(*key))
    load_base(model, spec.base)
    return model.eval()


@functools.lru_cache(maxsize=32)
def _prototype(arch: Architecture, frozen_config: tuple, dtype: torch.dtype, device: str) -> nn.Module:
    with torch.device(device):
        return construct(arch, dict(frozen_config), dtype).eval()


@functools.lru_cache(maxsize=32)
@torch.no_grad()
def cannot_run(arch: Architecture, frozen_config: tuple, dtype: torch.dtype, device: str) -> str | None:
    """Why the installed transformers cannot run the plain base model (no LoRA anywhere) in ``dtype``, or
    None. Older releases paired with old PEFT releases have such gaps (transformers 4.36's Llama builds
    its causal mask from ``finfo(float64).min`` in float32 and raises in float64); a base that cannot run
    asks nothing of LoRA, so its cells are skipped with this reason instead of blamed on the target.
    The library families are not transformers models: their own targets report what their library lacks."""
    if family(arch) is not None:
        return None
    model = _prototype(arch, frozen_config, dtype, device)
    ids = torch.zeros((2, 3), dtype=torch.long, device=device)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]], device=device)  # left padding, as the examples draw
    try:
        model(input_ids=ids, attention_mask=mask)
    except Exception as e:  # noqa: BLE001 - any failure of the bare base model is the reason
        first = str(e).splitlines()[0][:160] if str(e) else ""
        return (
            f"transformers {transformers().__version__} cannot run a plain {model_class(arch).__name__} in "
            f"{str(dtype).removeprefix('torch.')} ({type(e).__name__}: {first}): no LoRA involved"
        )
    return None


@torch.no_grad()
def load_base(model: nn.Module, base: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = set(params) - set(base)
    if missing:
        raise ValueError(f"spec holds no value for {sorted(missing)}")
    for name, value in base.items():
        params[name].copy_(value)


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter once (a tied twin under the name that owns it), as ``build_base`` wants them."""
    return {n: p.detach() for n, p in model.named_parameters()}


def outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model computes: logits for the language models, hidden states and pooler for BERT."""
    out = model(**batch)
    if isinstance(out, torch.Tensor):  # torchtune's decoder returns its logits as they are
        return {"logits": out.detach()}
    if hasattr(out, "sample"):  # a diffusers UNet
        return {"sample": out.sample.detach()}
    if hasattr(out, "logits") and out.logits is not None:
        return {"logits": out.logits.detach()}
    return {"last_hidden_state": out.last_hidden_state.detach(), "pooler_output": out.pooler_output.detach()}


def canonical_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight in the layer half's canonical ``(out, in)`` layout."""
    w = module.weight.detach()
    return w.T if is_conv1d(module) else w


def save_pretrained(spec: ModelSpec, model: nn.Module, directory: str) -> None:
    """The architecture's own save path (``save_pretrained``, or the family's where there is none)."""
    fam = family(spec.architecture)
    if fam is not None:
        fam.save_pretrained(model, spec.config, directory)
    else:
        model.save_pretrained(directory)


@torch.no_grad()
def from_pretrained(spec: ModelSpec, directory: str) -> nn.Module:
    """``Model.from_pretrained(directory, dtype=spec.dtype)``, its parameters then moved into freshly
    allocated memory (tied twins stay one tensor).

    transformers memory-maps safetensors, so parameters can start at addresses that are not 64-byte
    aligned; torch's CPU kernels then take another vector path and round float32 sums differently
    (measured: a plain tiny Llama saved and reloaded gives different logits in the last bit, 20 of 20
    seeds, with bit-identical weights). That is a property of the memory, not of any library under
    test, so the model-level save/load properties compare models whose parameters sit in fresh memory.
    """
    fam = family(spec.architecture)
    with torch.device(spec.device):
        if fam is not None:
            model = fam.from_pretrained(directory, spec.dtype)
        else:
            model = model_class(spec.architecture).from_pretrained(directory, **dtype_kw(spec.dtype))
    for p in model.parameters():  # deduplicated: a tied parameter object is re-homed once
        p.data = p.data.clone()
    for _, m in model.named_modules():
        for name, b in list(m.named_buffers(recurse=False)):
            m._buffers[name] = b.clone()
    return model.eval()
