"""A Hypothesis property suite that checks any LoRA implementation against LoRA's semantics.

Layers, one way: ``strategies`` -> ``spec`` -> target (``targets``) -> measurements (``precision``,
``oracle``) -> verdict (``catalogue``, ``checks``, ``runner``) -> report (``reporting``).
"""

__version__ = "0.1.0"
