"""Adapter hyper-parameters, validated once so layers can trust them."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class LoraConfig:
    """Hyper-parameters of one adapter, named as in PEFT.

    ``init_lora_weights=True`` initialises like PEFT (the adapter starts as a no-op);
    ``False`` makes both factors random, which tests need to see a non-zero delta.
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    init_lora_weights: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, numbers.Integral):
            raise TypeError(f"r must be a positive integer, got {self.r!r}")
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, numbers.Real) or not math.isfinite(self.lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, numbers.Real) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.use_dora and self.lora_bias:
            raise ValueError("use_dora=True with lora_bias=True is not supported (as in PEFT)")
        for flag in ("use_rslora", "use_dora", "lora_bias", "init_lora_weights"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
