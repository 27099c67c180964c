"""Finding a target by name (built-in) or by ``module:attribute`` (a user's own)."""

from __future__ import annotations

import importlib
import os
import sys

from properties.targets.protocol import Target

BUILTIN = {
    "reference": "properties.targets.reference:TARGET",
    "quantized-reference": "properties.targets.quantized_reference:TARGET",
    "peft": "properties.targets.peft_target:TARGET",
    "loralib": "properties.targets.loralib_target:TARGET",
    "torchtune": "properties.targets.torchtune_target:TARGET",
    "litgpt": "properties.targets.litgpt_target:TARGET",
    "diffusers": "properties.targets.diffusers_target:TARGET",
    "lycoris": "properties.targets.lycoris_target:TARGET",
    "adapters": "properties.targets.adapters_target:TARGET",  # adapter-hub `adapters` (model half by name)
    "keras": "properties.targets.keras_target:TARGET",  # Keras 3, KERAS_BACKEND=torch
}


class TargetLoadError(Exception):
    """The target could not be found or imported; the message is one line for the user."""


def load_target(name: str) -> Target:
    """``reference``, ``peft``, ... or ``package.module:attribute`` (an instance, or a class/factory)."""
    path = BUILTIN.get(name, name)
    if ":" not in path:
        known = ", ".join(sorted(BUILTIN))
        raise TargetLoadError(f"unknown target {name!r}: use one of {known} or 'module:attribute'")
    module_name, attr = path.split(":", 1)
    if os.getcwd() not in sys.path:
        # Like `python -m`, a user's module in the working directory is importable.
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to see, in one line
        raise TargetLoadError(
            f"cannot import {module_name!r} for target {name!r}: {type(e).__name__}: {e}"
        ) from e
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise TargetLoadError(f"module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "build")):
        obj = obj()
    for needed in ("name", "version", "capabilities", "build"):
        if not hasattr(obj, needed):
            raise TargetLoadError(
                f"{path} is not a target: it has no {needed!r} (see properties/targets/protocol.py)"
            )
    return obj
