"""How far repeated merge -> unmerge cycles move a quantized weight, with the libraries' own quantizers.

For each quantizer: 40 random 16x32 weights, a delta of 1%-100% of W, up to 10 cycles of
``Q(D(Q(D(W) + d)) - d)`` (exact float64 between dequantize and quantize, as the quantized reference does).
Prints the largest movement in grid steps of the original weight (block scale x largest code gap) and
the largest share of weights that moved. Run: ``python scripts/quantized_drift.py`` (``quant`` extra).
"""

from __future__ import annotations

import warnings

import torch

from properties.quantized import model
from properties.spec import LayerSpec, QuantSpec
from properties.targets.quantized_reference import quantize

CYCLES = (1, 2, 5, 10)


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    for kind in ("bnb_int8", "bnb_nf4", "bnb_fp4", "torchao_int8"):
        worst = dict.fromkeys(CYCLES, 0.0)
        share = dict.fromkeys(CYCLES, 0.0)
        for trial in range(40):
            w = torch.randn(16, 32, generator=g, dtype=torch.float64)
            size = 10 ** (-2 + 2 * torch.rand(1, generator=g).item())
            d = torch.randn(16, 32, generator=g, dtype=torch.float64) * size
            spec = LayerSpec(
                "linear", torch.float32, w.float(), (), quant=QuantSpec(kind, 4, 64, trial % 2 == 0)
            )
            qs0 = qs = quantize(spec, w)
            step = model.gap_max(qs0.codebook) * qs0.per_element(qs0.scale).reshape(w.shape)
            for n in range(1, max(CYCLES) + 1):
                qs = quantize(spec, quantize(spec, qs.decode() + d).decode() - d)
                if n in worst:
                    moved = (qs.decode() - qs0.decode()).abs() / step
                    worst[n] = max(worst[n], float(moved.max()))
                    share[n] = max(share[n], float((moved > 1e-9).double().mean()))
        steps = " / ".join(f"{worst[n]:.1f}" for n in CYCLES)
        moved = " / ".join(f"{share[n]:.0%}" for n in CYCLES)
        print(f"{kind:13} grid steps after {CYCLES} cycles: {steps}; weights moved: {moved}")


if __name__ == "__main__":
    main()
