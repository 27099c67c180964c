"""What the library families (``unet``, ``torchtune_llama``, ``litgpt``) share, written once: each
family module differs only in its layer-count key and in how it names a module's LoRA group."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from properties.models.protocol import ModelCapabilities
from properties.targets.protocol import Capabilities


def narrowed(
    caps: Capabilities, *, group_of: Callable[[str], str | None], uniform_rank: bool
) -> ModelCapabilities:
    """``caps`` under a library's own configuration rule, stated as :class:`ModelCapabilities` fields.

    torchtune and litgpt switch LoRA on per kind of module (``group_of``) with one rank and alpha for
    the model. The rule belongs to the architecture, not to a target: the reference drawn on that
    architecture must draw what the library can express, or its cells would not be the library's.
    A target's own rules are kept; a target with its own ``group_of`` cannot be narrowed by another."""
    fields = {f.name: getattr(caps, f.name) for f in dataclasses.fields(Capabilities)}
    own = {k: getattr(caps, k, None) for k in ("targetable", "closure", "group_of")}
    if own["group_of"] is not None:
        raise ValueError("a target with its own group_of on a grouped architecture: two group rules")
    return ModelCapabilities(
        **fields,
        targetable=own["targetable"],
        closure=own["closure"],
        uniform_rank=uniform_rank or bool(getattr(caps, "uniform_rank", False)),
        group_of=lambda _arch, path: group_of(path),
    )


def one_layer_fewer(config: dict[str, object], layers_key: str) -> dict[str, object]:
    """``config`` with one block less (the model the ``fewer layers`` checks compare against)."""
    return {**config, layers_key: int(config[layers_key]) - 1}
