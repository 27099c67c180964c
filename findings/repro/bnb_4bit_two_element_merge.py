"""A 4-bit weight with exactly two elements comes back transposed from ``dequantize_4bit``, and PEFT's
``Linear4bit.merge`` broadcasts it against the delta: the merged layer's weight becomes 2x2.

bitsandbytes 0.50.2 packs two 4-bit codes per byte; for a (2, 1) or (1, 2) weight the packed data is
(1, 1), and ``dequantize_4bit`` returns the transposed shape. PEFT 0.21.2 computes
``dequantized + delta`` without a shape check, so (1, 2) + (2, 1) broadcasts to (2, 2), is quantized as
such, and the next forward fails (``mat1 and mat2 shapes cannot be multiplied``).
Exit status 1 when the bug is present.
"""

import sys
import warnings

import bitsandbytes as bnb
import torch

warnings.simplefilter("ignore")

failures = []
for shape in ((2, 1), (1, 2), (4, 1)):
    p = bnb.nn.Params4bit(torch.randn(*shape), requires_grad=False, quant_type="nf4").to("cpu")
    got = tuple(bnb.functional.dequantize_4bit(p.data, p.quant_state).shape)
    ok = got == shape
    print(f"dequantize_4bit of a {shape} weight has shape {got}:", "OK" if ok else "FAIL")
    if not ok:
        failures.append(shape)
print(f"bitsandbytes {bnb.__version__}:", "FAIL" if failures else "OK", failures)
sys.exit(1 if failures else 0)
