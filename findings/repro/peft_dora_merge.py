"""DoRA merge bugs (dora-half-merge-fp32, dora-embedding-merge) and the weight-norm cache a refused DoRA
safe merge leaves (dora-safe-merge-cache). dora-fan-in-fan-out-merge has no repro here: a plain GPT-2
``Conv1D`` DoRA merge does not show it (it needs what the suite's shrunk example had; see findings/peft.md).

1. half_merge_dtype: merging a DoRA adapter into a bfloat16 Linear must leave the weight in bfloat16.
2. embedding_merge: a DoRA merge into an Embedding must give the unmerged output (the magnitude applied),
   with a magnitude other than the initial ||W + dW||.
3. safe_merge_cache: a DoRA ``merge(safe_merge=True)`` refused for a NaN must leave the layer's state as it
   was (no ``_caches`` entry left behind).

A check the release cannot build (no DoRA, no DoRA for that layer) prints n/a. Exit status 1 when any
check fails.
"""

import sys
import warnings

import peft
import torch
from peft import LoraConfig, get_peft_model
from torch import nn


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def dora(base: nn.Module, **kw):
    torch.manual_seed(0)
    cfg = LoraConfig(
        target_modules=["layer"], r=2, lora_alpha=3, use_dora=True, init_lora_weights=False, **kw
    )
    return get_peft_model(Holder(base), cfg).eval()


def merge(layer, **kw) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge(**kw)


def half_merge_dtype() -> str:
    model = dora(nn.Linear(4, 3, dtype=torch.bfloat16))
    layer = model.get_base_model().layer
    merge(layer)
    dtype = layer.get_base_layer().weight.dtype
    return "ok" if dtype == torch.bfloat16 else f"FAIL: merged weight is {dtype}, base was torch.bfloat16"


def embedding_merge() -> str:
    model = dora(nn.Embedding(5, 3).double())
    layer = model.get_base_model().layer
    x = torch.tensor([0, 2, 4])
    with torch.no_grad():
        # The initial magnitude is ||W + dW||, where leaving it out changes nothing: move it off.
        layer.lora_magnitude_vector["default"].weight.mul_(1.5)
        unmerged = layer(x)
        merge(layer)
        err = (layer(x) - unmerged).abs().max().item()
    return "ok" if err < 1e-10 else f"FAIL: merged vs unmerged output differ by {err:.3g}"


def safe_merge_cache() -> str:
    model = dora(nn.Linear(4, 3).double())
    layer = model.get_base_model().layer
    with torch.no_grad():
        layer.lora_A["default"].weight[0, 0] = float("nan")
    before = set(layer.state_dict())
    caches_before = dict(getattr(layer, "_caches", {}))
    try:
        merge(layer, safe_merge=True)
    except ValueError:
        pass
    else:
        return "FAIL: a NaN adapter was merged without ValueError"
    caches = dict(getattr(layer, "_caches", {}))
    extra = sorted(set(layer.state_dict()) - before) + sorted(set(caches) - set(caches_before))
    return "ok" if not extra else f"FAIL: the refused merge left {extra}"


try:
    LoraConfig(use_dora=True)
except TypeError as e:
    print(f"peft {peft.__version__}: N/A: TypeError: {e}")
    sys.exit(0)

failed = []
for check in (half_merge_dtype, embedding_merge, safe_merge_cache):
    try:
        verdict = check()
    except (ValueError, NotImplementedError, TypeError) as e:  # cannot build this layer with DoRA
        verdict = f"n/a ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:70]})"
    except RuntimeError as e:
        verdict = f"FAIL: RuntimeError: {(str(e).splitlines() or [''])[0][:90]}"
    print(f"  {check.__name__}: {verdict}")
    if verdict.startswith("FAIL"):
        failed.append(check.__name__)
ok = not failed
print(
    f"peft {peft.__version__}: {'OK' if ok else 'FAIL'}: DoRA merges"
    + ("" if ok else ": " + ", ".join(failed))
)
sys.exit(0 if ok else 1)
