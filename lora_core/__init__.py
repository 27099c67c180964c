"""Reference LoRA: exact, readable LoRA/DoRA layers with PEFT's vocabulary and merge semantics.

Imports only torch. The contract, shared by every layer (see ``LoraLayer``):

- Factors live in the base weight's dtype and device. Deltas are formed in float32 (float64 for
  float64 bases) and a merge writes ``round(W + delta)``, rounded once; unmerge likewise.
- ``merge(safe_merge=True)`` computes everything first and raises ``ValueError`` on NaN/Inf
  (including overflow when rounding to half precision), leaving all state bit-identical.
- ``wrap(..., exact_unmerge=True)`` keeps one extra copy of the merged parameters while merged so
  ``unmerge()`` restores them bit-identically; by default unmerge subtracts.
- Disabled adapters return exactly ``base_layer(x)``; a forward while disabled *and* merged
  unmerges first (with a warning), as PEFT does.
- Half and bfloat16 forwards run natively on CPU (checked on torch 2.13 for linear, conv1d/2d/3d,
  embedding and attention), so no op is upcast.
"""

from . import model
from .config import LoraConfig
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .layer import BASE, LoraLayer, MergePlan, compute_dtype
from .linear import Conv1D, Linear
from .mha import MultiheadAttention
from .saved import ModulesToSave
from .wrap import inject, wrap

__version__ = "0.1.0"

__all__ = [
    "BASE",
    "Conv1D",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "Linear",
    "LoraConfig",
    "LoraLayer",
    "MergePlan",
    "ModulesToSave",
    "MultiheadAttention",
    "compute_dtype",
    "inject",
    "model",
    "wrap",
]
