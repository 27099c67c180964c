"""What the library families (``unet``, ``torchtune_llama``, ``litgpt``) share, written once: each
family module differs only in its layer-count key and in how it names a module's LoRA group."""

from __future__ import annotations

from collections.abc import Callable


def group_paths(paths: tuple[str, ...], group_of: Callable[[str], str | None]) -> dict[str, list[str]]:
    """``paths`` grouped by ``group_of`` (paths without a group left out), in model order."""
    groups: dict[str, list[str]] = {}
    for p in paths:
        g = group_of(p)
        if g is not None:
            groups.setdefault(g, []).append(p)
    return groups


def one_layer_fewer(config: dict[str, object], layers_key: str) -> dict[str, object]:
    """``config`` with one block less (the model the ``fewer layers`` checks compare against)."""
    return {**config, layers_key: int(config[layers_key]) - 1}
