"""What every torchtune layer handle answers the same way: one adapter per layer and no scale API.

Shared by the float handle (``torchtune_target``) and the QLoRA handle (``torchtune_qlora``), so the two
cannot drift apart on what torchtune lacks. A subclass sets ``adapter``, ``merged`` and ``enabled``."""

from __future__ import annotations

from collections.abc import Sequence

from properties.targets.protocol import Unsupported


class TorchtuneLayerOps:
    adapter: object
    merged: bool
    enabled: bool

    def merged_adapters(self) -> list[str]:
        return [self.adapter.name] if self.merged else []

    def set_active(self, names: Sequence[str]) -> None:
        raise Unsupported("torchtune has one adapter per layer")

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def set_scale(self, name: str, scale: float) -> None:
        raise Unsupported("torchtune has no scale API")

    def scale_layer(self, factor: float) -> None:
        raise Unsupported("torchtune has no scale API")

    def unscale_layer(self, factor: float | None = None) -> None:
        raise Unsupported("torchtune has no scale API")
