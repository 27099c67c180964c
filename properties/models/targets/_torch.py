"""What every model handle over a torch module tree shares: forwards, hooks, names and state."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from properties.models import architectures as archs
from properties.targets.protocol import Unsupported


class TorchModelHandle:
    """A model handle whose model is a torch module; ``prefix`` is where the transformers model sits."""

    prefix = ""  # module path of the transformers model inside ``self.root`` (PEFT: base_model.model)
    # path segments a LoRA wrapper (``base_layer``) or a modules_to_save wrapper (``original_module``,
    # PEFT's and lora_core's name alike) inserts before a base parameter
    wrapper_segments: tuple[str, ...] = ("base_layer", "original_module")

    def __init__(self, root: nn.Module) -> None:
        self.root = root

    # -- forwards --------------------------------------------------------------------------------

    @torch.no_grad()
    def outputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.root.eval()
        return archs.outputs(self.root, batch)

    @torch.no_grad()
    def capture(self, batch: dict[str, torch.Tensor], paths: Sequence[str]) -> dict[str, tuple]:
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = []
        for path in paths:

            def hook(module, args, output, path=path):
                seen.setdefault(path, (args[0].detach().clone(), output.detach().clone()))

            hooks.append(self.hooked(path).register_forward_hook(hook))
        try:
            self.outputs(batch)
        finally:
            for h in hooks:
                h.remove()
        return seen

    # -- structure -------------------------------------------------------------------------------

    def hooked(self, path: str) -> nn.Module:
        """The module whose forward ``capture`` records at ``path`` (the one the model calls)."""
        return self.module(path)

    def module(self, path: str) -> nn.Module:
        full = ".".join(p for p in (self.prefix, path) if p)
        return self.root.get_submodule(full)

    def modules(self) -> dict[str, type]:
        return {name: type(m) for name, m in self.root.named_modules()}

    def parameters(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.root.named_parameters()}

    def _base_name(self, name: str) -> str | None:
        """The transformers name of a base parameter, or None for an adapter's (its LoRA factors and its
        trained copies of ``modules_to_save``)."""
        if "lora_" in name or ".modules_to_save." in f".{name}":
            return None
        if self.prefix and name.startswith(self.prefix + "."):
            name = name[len(self.prefix) + 1 :]
        for seg in self.wrapper_segments:
            name = re.sub(rf"(^|\.){seg}\.", r"\1", name)
        return name

    def base_parameters(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in self.root.named_parameters(remove_duplicate=False):
            key = self._base_name(n)
            if key is not None:
                out[key] = p.detach()
        return out

    def snapshot(self) -> dict[str, object]:
        snap: dict[str, object] = {f"param:{k}": v.clone() for k, v in self.parameters().items()}
        snap.update({f"buffer:{k}": v.clone() for k, v in self.root.named_buffers()})
        snap["modules"] = {k: v.__name__ for k, v in self.modules().items()}
        return snap

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Overridden where the library has a switch; without one the cell is skipped."""
        raise Unsupported(f"{type(self).__name__} has no way to disable adapters")
        yield
