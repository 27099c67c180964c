"""Hugging Face PEFT as a conformance target, for every release from 0.7.0 to 0.21.x.

Layers are built through PEFT's model-level API (``get_peft_model`` / ``add_adapter``), the one API that
stayed stable across releases; the layer constructors changed signature three times. The exact spec
tensors are then loaded into PEFT's factors, and every operation is driven at layer level
(``merge``/``unmerge``/``set_adapter``/...), which also exists in all supported releases.

What the installed release can do is detected by feature (``LoraConfig`` fields, method signatures,
attributes, and one tiny probe build per layer kind), never by a version table, so a backport or a
removal is seen as it is. PEFT errors that mean "this release cannot do that" become
:class:`~properties.targets.protocol.Unsupported`; anything else propagates as the target's error.

PEFT's conv ``lora_A`` is ``Conv(in, r, kernel, stride, padding)`` with no dilation and no padding
mode, yet PEFT accepts such layers without a word. The options are therefore not declared (so the
merge properties test conv geometry PEFT does implement), and the ``layer_options_honoured`` property,
which draws every base-layer option whatever a target declares, reports the mismatch once, clearly.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import torch
from torch import nn

from properties.spec import CONV_KINDS, DTYPES, AdapterSpec, LayerKind, LayerSpec
from properties.targets._library import Holder, base_weights, cloned_state, dense_groups, import_or_raise
from properties.targets.protocol import OPERATIONS, Capabilities, Unsupported
from properties.targets.reference import base_module

# Substrings of PEFT error messages that mean "this release does not do that" (not a numerical failure).
_UNSUPPORTED_MESSAGES = (
    "not supported",
    "does not support",
    "not implemented",
    "Cannot pass `adapter_names`",
    "Impossible to merge",
    "unexpected keyword argument 'adapter_names'",
    "Only same embed",
    "is not supported",
)


def _peft() -> Any:
    """Import PEFT lazily, so this module (and the suite) imports without it."""
    message = "the peft target needs the `peft` package: pip install 'lora-conformance[peft]'"
    return import_or_raise("peft", RuntimeError, message)


def _conv1d_class() -> type[nn.Module] | None:
    """GPT-2's ``Conv1D`` (weights stored ``(in, out)``), or ``None`` without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


@contextmanager
def _quiet() -> Iterator[None]:
    """PEFT warns freely (already merged, fan_in_fan_out fixed up, ...); the suite judges behaviour."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextmanager
def _translated(version: str, what: str, *, everything: bool = False) -> Iterator[None]:
    """Turn PEFT's "cannot do that" errors into :class:`Unsupported` naming the release.

    With ``everything``, any ValueError/TypeError/NotImplementedError counts: used around layer
    creation, where PEFT refusing a configuration is by definition a missing capability.
    """
    try:
        with _quiet():
            yield
    except Unsupported:
        raise
    except NotImplementedError as e:
        raise Unsupported(f"peft {version}: {what}: {e}") from e
    except (ValueError, TypeError, RuntimeError) as e:
        if (everything and not isinstance(e, RuntimeError)) or any(
            m in str(e) for m in _UNSUPPORTED_MESSAGES
        ):
            raise Unsupported(f"peft {version}: {what}: {e}") from e
        raise


def _set(param_or_module: Any, value: torch.Tensor) -> None:
    """Copy ``value`` into a PEFT factor (a Parameter in old releases, a module's weight in new ones)."""
    target = param_or_module if isinstance(param_or_module, torch.Tensor) else param_or_module.weight
    if target.numel() != value.numel():
        raise RuntimeError(f"shape mismatch loading {tuple(value.shape)} into {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(value.reshape(target.shape).to(target.dtype))


def _factor(obj: Any) -> torch.Tensor:
    return obj if isinstance(obj, torch.Tensor) else obj.weight


def _gpt2_conv1d(fan_in: int, fan_out: int) -> nn.Module:
    """transformers' ``Conv1D(nf=out, nx=in)``: PEFT recognises that class for fan_in_fan_out."""
    conv1d = _conv1d_class()
    if conv1d is None:
        raise Unsupported("fan_in_fan_out needs transformers' Conv1D")
    return conv1d(fan_out, fan_in)


def _base_module(spec: LayerSpec) -> nn.Module:
    """The plain torch layer of ``spec``, holding the spec's exact base tensors in ``spec.dtype``."""
    if spec.kind == "embedding" and spec.base_bias is not None:
        raise Unsupported("an embedding has no bias")
    return base_module(spec, conv1d=_gpt2_conv1d)


class PeftHandle:
    """One PEFT LoRA layer built from a spec; tensors cross this boundary in canonical layout."""

    def __init__(self, spec: LayerSpec, model: nn.Module, layer: nn.Module, version: str) -> None:
        self.spec = spec
        self.model = model  # the PeftModel, for train/eval and merge_and_unload
        self.layer = layer  # the LoRA layer that replaced ``Holder.layer``
        self.version = version

    # -- helpers ---------------------------------------------------------------------------------

    def _lora_layers(self) -> list[nn.Module]:
        """The LoRA layer plus any nested one (MHA's ``out_proj``): layer-level state lives in each."""
        lora_layer = _peft().tuners.lora.LoraLayer
        return [m for m in self.layer.modules() if isinstance(m, lora_layer)]

    def _out_proj(self) -> nn.Module:
        return self.layer.get_base_layer().out_proj

    def _stored_weights(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        base = layer.get_base_layer()
        s = self.spec
        if s.kind == "mha":
            out_proj = (
                base.out_proj.get_base_layer() if hasattr(base.out_proj, "get_base_layer") else base.out_proj
            )
            found = {
                "in_proj_weight": base.in_proj_weight,
                "in_proj_bias": base.in_proj_bias,
                "out_proj.weight": out_proj.weight,
                "out_proj.bias": out_proj.bias,
            }
            return {k: found[k].detach().clone() for k in s.base_tensors()}
        return base_weights(base, s)

    def _translated(self, what: str) -> Any:
        return _translated(self.version, what)

    # -- LayerHandle -----------------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, *, train: bool = False, adapter_names: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Run the LoRA layer itself (the PeftModel only forwards to it); MHA is self-attention."""
        self.model.train(train)
        kwargs = {} if adapter_names is None else {"adapter_names": list(adapter_names)}
        what = "forward" if adapter_names is None else "mixed-batch forward"
        with self._translated(what), torch.no_grad():
            if self.spec.kind == "mha":
                if adapter_names is not None:
                    raise Unsupported(f"peft {self.version}: MultiheadAttention has no mixed-batch forward")
                return self.layer(x, x, x, need_weights=False)[0]
            return self.layer(x, **kwargs)

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        conv = self.spec.conv
        if conv is not None and conv.groups > 1:
            # PEFT >= 0.15 raises NotImplementedError; older releases compute a dense delta of the wrong
            # shape and fail in the in-place add. Either way the merge does not exist.
            raise Unsupported(f"peft {self.version}: merging a conv layer with groups > 1 is not implemented")
        names = None if adapter_names is None else list(adapter_names)
        with self._translated("merge"):
            self.layer.merge(safe_merge=safe, adapter_names=names)

    def unmerge(self) -> None:
        with self._translated("unmerge"):
            self.layer.unmerge()

    def merged_adapters(self) -> list[str]:
        return list(self.layer.merged_adapters)

    def set_active(self, names: Sequence[str]) -> None:
        with self._translated("set_adapter"):
            for m in self._lora_layers():
                m.set_adapter(list(names))

    def set_enabled(self, enabled: bool) -> None:
        for m in self._lora_layers():
            m.enable_adapters(enabled)

    def set_scale(self, name: str, scale: float) -> None:
        self._layer_op("set_scale", name, scale)

    def scale_layer(self, factor: float) -> None:
        self._layer_op("scale_layer", factor)

    def unscale_layer(self, factor: float | None = None) -> None:
        self._layer_op("unscale_layer", factor)

    def _layer_op(self, op: str, *args: Any) -> None:
        if not hasattr(self.layer, op):
            raise Unsupported(f"peft {self.version}: LoRA layers have no {op}()")
        for m in self._lora_layers():
            getattr(m, op)(*args)

    def weights(self) -> dict[str, torch.Tensor]:
        return self._stored_weights(self.layer)

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT's own delta (``get_delta_weight``); for DoRA, what PEFT's merge adds on a copy."""
        s = self.spec
        if s.conv is not None and s.conv.groups > 1:
            raise Unsupported(f"peft {self.version}: no merge (hence no delta) for conv with groups > 1")
        a = s.adapter(name)
        dtype = s.dtype
        with self._translated("delta_weight"), torch.no_grad():
            if a.use_dora:
                trial = copy.deepcopy(self.layer)
                trial.merge(adapter_names=[name])
                before, after = self.weights(), self._stored_weights(trial)
                keys = [k for k in before if k != "bias" or a.bias is not None]
                return {k: after[k] - before[k] for k in keys}
            if s.kind == "mha":
                return {
                    "in_proj_weight": self.layer.get_delta_weight(name).to(dtype),
                    "out_proj.weight": self._out_proj().get_delta_weight(name).to(dtype),
                }
            delta = self.layer.get_delta_weight(name)
            out = {"weight": (delta.T if s.fan_in_fan_out else delta).to(dtype)}
            lora_bias = None if s.kind == "embedding" else self.layer.lora_B[name].bias
            if lora_bias is not None:
                out["bias"] = (lora_bias * self.layer.scaling[name]).to(dtype)
            return out

    def snapshot(self) -> dict[str, object]:
        snap = cloned_state(self.layer, "param.")
        for i, m in enumerate(self._lora_layers()):
            snap[f"{i}.merged_adapters"] = list(m.merged_adapters)
            snap[f"{i}.active_adapters"] = list(m.active_adapters)
            snap[f"{i}.disable_adapters"] = bool(m.disable_adapters)
            snap[f"{i}.scaling"] = dict(m.scaling)
            # `or {}`: PEFT 0.9-0.10 set lora_magnitude_vector to None until a DoRA adapter is added.
            for k, v in (getattr(m, "_caches", None) or {}).items():
                snap[f"{i}._caches.{k}"] = v.detach().clone() if isinstance(v, torch.Tensor) else v
            for name, mag in (getattr(m, "lora_magnitude_vector", None) or {}).items():
                for k, v in (getattr(mag, "_dora_cache", None) or {}).items():
                    snap[f"{i}.dora_cache.{name}.{k}"] = (
                        v.detach().clone() if isinstance(v, torch.Tensor) else v
                    )
        return snap

    def merge_and_unload(self) -> nn.Module:
        conv = self.spec.conv
        if conv is not None and conv.groups > 1:
            raise Unsupported(f"peft {self.version}: merging a conv layer with groups > 1 is not implemented")
        with self._translated("merge_and_unload"):
            return self.model.merge_and_unload().layer


class PeftTarget:
    """Hugging Face PEFT (``peft.tuners.lora``), capabilities detected on the installed release."""

    name = "peft"

    def version(self) -> str:
        return str(_peft().__version__)

    @cached_property
    def _config_fields(self) -> frozenset[str]:
        return frozenset(inspect.signature(_peft().LoraConfig).parameters)

    def _probe(self, kind: LayerKind) -> str | None:
        """Build a tiny layer of ``kind`` through ``get_peft_model``: ``None`` if PEFT takes it, else why."""
        base = {
            "linear": lambda: nn.Linear(2, 2),
            "embedding": lambda: nn.Embedding(3, 2),
            "conv1d": lambda: nn.Conv1d(2, 2, 1),
            "conv2d": lambda: nn.Conv2d(2, 2, 1),
            "conv3d": lambda: nn.Conv3d(2, 2, 1),
            "mha": lambda: nn.MultiheadAttention(2, 1, batch_first=True),
        }[kind]()
        peft = _peft()
        try:
            with _quiet():
                peft.get_peft_model(Holder(base), peft.LoraConfig(target_modules=["layer"], r=1))
        except (ValueError, TypeError, NotImplementedError) as e:
            return f"get_peft_model rejects {type(base).__name__}: {str(e).splitlines()[0][:60]}..."
        return None

    @cached_property
    def _capabilities(self) -> Capabilities:
        peft = _peft()
        v = self.version()
        lora = peft.tuners.lora
        notes: dict[str, str] = {}
        layers = set()
        for kind in ("linear", "embedding", "conv1d", "conv2d", "conv3d", "mha"):
            why = self._probe(kind)
            if why is None:
                layers.add(kind)
            else:
                notes[kind] = f"peft {v}: {why}"

        from properties.targets import peft_quantized

        quantized, why = peft_quantized.available()  # bitsandbytes layers through transformers
        layers |= quantized
        notes.update(why)
        ops = set(OPERATIONS)
        notes["exact_unmerge"] = f"peft {v}: unmerge subtracts the delta in floating point; not bit-exact"
        ops.discard("exact_unmerge")
        merge_params = inspect.signature(lora.Linear.merge).parameters
        if "safe_merge" not in merge_params:
            ops.discard("safe_merge")
            notes["safe_merge"] = f"peft {v}: Linear.merge has no safe_merge"
        if "adapter_names" not in merge_params:
            ops.discard("merge_subset")
            notes["merge_subset"] = f"peft {v}: Linear.merge has no adapter_names"
        if not hasattr(lora.LoraLayer, "_mixed_batch_forward"):
            ops.discard("mixed_batch")
            notes["mixed_batch"] = f"peft {v}: no mixed-batch forward (adapter_names) in LoRA layers"
        for op in ("set_scale", "scale_layer"):
            if not hasattr(lora.LoraLayer, op):
                ops.discard(op)
                notes[op] = f"peft {v}: LoraLayer has no {op}()"
        if not hasattr(lora.LoraLayer, "unscale_layer"):
            ops.discard("scale_layer")

        options = {"multi_adapter", "dropout", "padding_idx", "conv_groups", "padding_same"}
        notes["conv_dilation"] = "accepted silently, but lora_A ignores dilation (see layer_options_honoured)"
        notes["padding_mode"] = "accepted silently, but lora_A always zero-pads (see layer_options_honoured)"
        for option, field in (("rslora", "use_rslora"), ("dora", "use_dora"), ("lora_bias", "lora_bias")):
            if field in self._config_fields:
                options.add(option)
            else:
                notes[option] = f"peft {v}: LoraConfig has no {field}"
        if "lora_bias" in options and "hqq_8bit" in quantized:
            if peft_quantized.hqq_accepts_lora_bias():
                options.add("hqq_lora_bias")
            else:
                notes["hqq_lora_bias"] = f"peft {v}: HqqLoraLinear does not support lora_bias"
        if _conv1d_class() is not None:
            options.add("fan_in_fan_out")
        else:
            notes["fan_in_fan_out"] = "transformers is not installed (no Conv1D base layer)"
        return Capabilities(
            layers=frozenset(layers),
            dtypes=frozenset(DTYPES.values()),
            operations=frozenset(ops),
            options=frozenset(options),
            notes=notes,
        )

    def capabilities(self) -> Capabilities:
        return self._capabilities

    def _config(self, spec: LayerSpec, a: AdapterSpec) -> Any:
        """One LoraConfig per adapter: rank, alpha and options may differ between adapters."""
        kw: dict[str, Any] = {
            "target_modules": ["layer"],
            "r": a.r,
            "lora_alpha": a.alpha,
            "lora_dropout": a.dropout,
            "fan_in_fan_out": spec.fan_in_fan_out,
            "init_lora_weights": False,
        }
        for on, field in (
            (a.use_rslora, "use_rslora"),
            (a.use_dora, "use_dora"),
            (a.bias is not None, "lora_bias"),
        ):
            if on and field not in self._config_fields:
                raise Unsupported(f"peft {self.version()}: LoraConfig has no {field}")
            if on:
                kw[field] = True
        return _peft().LoraConfig(**kw)

    def build(self, spec: LayerSpec) -> PeftHandle:
        peft = _peft()
        v = self.version()
        if spec.quant is not None:
            return self._build_quantized(spec)
        if spec.kind not in self._capabilities.layers:
            raise Unsupported(self._capabilities.notes.get(spec.kind, f"peft {v}: no {spec.kind} layers"))
        if spec.fan_in_fan_out and spec.kind != "linear":
            raise Unsupported("fan_in_fan_out applies to linear layers only")
        first, *rest = spec.adapters
        with _translated(v, f"building {spec.kind}", everything=True):
            model = peft.get_peft_model(
                Holder(_base_module(spec)), self._config(spec, first), adapter_name=first.name
            )
            for a in rest:
                model.add_adapter(a.name, self._config(spec, a))
        layer = model.get_base_model().layer
        for a in spec.adapters:
            self._load(spec, layer, a, v)
        handle = PeftHandle(spec, model, layer, v)
        handle.set_active(spec.active_adapters)
        model.eval()
        return handle

    def _build_quantized(self, spec: LayerSpec) -> PeftHandle:
        """A quantized base, loaded through transformers with its quantization config
        (``peft_quantized``), then ``get_peft_model`` as for any other layer."""
        from properties.targets import peft_quantized

        v = self.version()
        if spec.quant.kind not in self._capabilities.layers:
            raise Unsupported(
                self._capabilities.notes.get(spec.quant.kind, f"peft {v}: no {spec.quant.kind}")
            )
        if spec.dtype not in peft_quantized.COMPUTE_DTYPES:
            raise Unsupported(f"quantized layers compute in float32, bfloat16 or float16, not {spec.dtype}")
        first, *rest = spec.adapters
        with _translated(v, f"building {spec.quant.kind}", everything=True):
            model = _peft().get_peft_model(
                peft_quantized.load_quantized_model(spec), self._config(spec, first), adapter_name=first.name
            )
            for a in rest:
                model.add_adapter(a.name, self._config(spec, a))
        layer = model.get_base_model().layer
        for a in spec.adapters:
            self._load(spec, layer, a, v)
        handle = peft_quantized.make_handle_class(PeftHandle)(spec, model, layer, v)
        handle.set_active(spec.active_adapters)
        model.eval()
        return handle

    def _load(self, spec: LayerSpec, layer: nn.Module, a: AdapterSpec, version: str) -> None:
        """Load ``a``'s exact factors into PEFT's storage, converting canonical -> PEFT layout."""
        name = a.name
        if spec.kind == "embedding":
            _set(layer.lora_embedding_A[name], a.A)
            _set(layer.lora_embedding_B[name], a.B)
        elif spec.kind in CONV_KINDS:
            g = spec.conv.groups
            A, B = a.A, a.B
            if g > 1 and _factor(layer.lora_A[name]).shape[1] != A.shape[1]:
                A = dense_groups(A, g)
            if g > 1 and _factor(layer.lora_B[name]).shape[1] != B.shape[1]:
                B = dense_groups(B, g)
            _set(layer.lora_A[name], A)
            _set(layer.lora_B[name], B)
        else:
            _set(layer.lora_A[name], a.A)
            _set(layer.lora_B[name], a.B)
        if spec.kind == "mha":
            out_proj = layer.get_base_layer().out_proj
            _set(out_proj.lora_A[name], a.out_A)
            _set(out_proj.lora_B[name], a.out_B)
        if a.bias is not None:
            lora_bias = None if spec.kind == "embedding" else layer.lora_B[name].bias
            if lora_bias is None:
                raise Unsupported(f"peft {version}: lora_bias is not applied to {spec.kind} layers")
            with torch.no_grad():
                lora_bias.copy_(a.bias.to(lora_bias.dtype))
        if a.use_dora and a.magnitude is not None:
            mags = getattr(layer, "lora_magnitude_vector", None)
            if mags is None or name not in mags:
                raise Unsupported(f"peft {version}: DoRA is not applied to {spec.kind} layers")
            _set(mags[name], a.magnitude)


TARGET = PeftTarget()
