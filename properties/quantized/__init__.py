"""Quantized bases: LoRA on bitsandbytes 8-bit / 4-bit, HQQ, torchao int8 and NF4 weights (see README).

``state`` is the canonical form of stored codes every quantized target reports; ``model`` the precision
model (pure float64 functions of those codes); ``strategies`` draws the cells' structure; ``checks`` gives
the catalogue's properties their quantization-aware claims; ``tolerance`` the merge tolerance table.
"""
