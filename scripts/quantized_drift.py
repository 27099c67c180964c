"""How far repeated merge -> unmerge cycles move a quantized weight, with the libraries' own quantizers.

For each quantizer: 40 random 16x32 weights, a delta of 1%-100% of W, up to 10 cycles of
``Q(D(Q(D(W) + d)) - d)`` (exact float64 between dequantize and quantize, as the quantized reference does).
Prints the largest movement in grid steps of the original weight (block scale x largest code gap) and
the largest share of weights that moved. Run: ``python scripts/quantized_drift.py [kind ...]``
(``quant`` extra). HQQ: group size 64, the zero-point optimiser on every other trial. torchao NF4:
blocks of 16, scales double-quantized in groups of 8 (a 16x32 weight is too small for the default 64 / 256).
"""

from __future__ import annotations

import sys
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
    kinds = (
        *("bnb_int8", "bnb_nf4", "bnb_fp4", "torchao_int8", "torchao_nf4"),
        *("hqq_8bit", "hqq_4bit", "hqq_3bit", "hqq_2bit", "hqq_1bit"),
    )
    for kind in kinds if len(sys.argv) < 2 else sys.argv[1:]:
        worst = dict.fromkeys(CYCLES, 0.0)
        share = dict.fromkeys(CYCLES, 0.0)
        for trial in range(40):
            w = torch.randn(16, 32, generator=g, dtype=torch.float64)
            size = 10 ** (-2 + 2 * torch.rand(1, generator=g).item())
            d = torch.randn(16, 32, generator=g, dtype=torch.float64) * size
            if kind.startswith("hqq_"):  # group 64; HQQ's optimiser on every other trial
                bits = int(kind[4])
                q = QuantSpec(kind, bits, 64, optimize=trial % 2 == 0)
            elif kind == "torchao_nf4":
                q = QuantSpec(kind, 4, 16, True, scale_block=8)
            else:
                q = QuantSpec(kind, 4, 64, trial % 2 == 0)
            spec = LayerSpec("linear", torch.float32, w.float(), (), quant=q)
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
