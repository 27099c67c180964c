"""How small an error does the suite see? Plant a LoRA delta scaled by ``1 + eps`` and find the
smallest ``eps`` the ``ci`` profile flags, by the element-wise bound and by the bias statistic.

The planted target is the float64 oracle with every LoRA delta scaled by ``1 + eps`` and every
result rounded once to the dtype: a perfect implementation but for the planted error, so what is
measured is the suite, not some other rounding. It has a Linear layer, merge and ``delta_weights``;
``reference_delta`` compares the delta, ``merge_equivalence`` the merged weights and output and
``reference_forward`` the unmerged output. ``--storage-scaling`` plants the other defect of the
issue instead: ``alpha / r`` kept in the storage dtype (bfloat16, float16).

    python scripts/tightness.py [--seed 0] [--json docs/tightness.json]

Each ``eps`` is a power of two times the dtype's unit roundoff ``u``. A method "flags" ``eps`` when a
cell fails for it (element-wise: with the bias statistic switched off; bias: its failure message).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from properties import oracle  # noqa: E402
from properties.catalogue import Context, all_properties  # noqa: E402
from properties.precision import unit_roundoff  # noqa: E402
from properties.profiles import PROFILES  # noqa: E402
from properties.runner import Cell, RunOptions, run_cell  # noqa: E402
from properties.spec import DTYPES, LayerSpec  # noqa: E402
from properties.targets.protocol import Capabilities, Unsupported  # noqa: E402

F64 = torch.float64
PROPERTIES = ("reference_delta", "merge_equivalence", "reference_forward")
FACTORS = tuple(2.0**k for k in range(-5, 11))  # eps / u


def _ld(t) -> np.ndarray:
    """A float64 tensor or number in extended precision (x87 long double: 64-bit significand)."""
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", F64).numpy().astype(np.longdouble)
    return np.longdouble(t)


def _add(stored: torch.Tensor | None, d) -> torch.Tensor:
    """``stored + d`` as float64 (a float64 tensor; ``d`` float64 or extended), not yet rounded to the
    storage dtype; extended sums are rounded once to float64 here."""
    if isinstance(d, np.ndarray):
        total = d if stored is None else _ld(stored) + d
        return torch.from_numpy(total.astype(np.float64))
    return d if stored is None else stored.to(F64) + d


class PlantedHandle:
    """The oracle, with each adapter's delta scaled by ``1 + eps(adapter)``, rounded once."""

    def __init__(self, spec: LayerSpec, error: Callable[[LayerSpec, str], float]):
        self.spec = spec
        self.error = error
        self.stored = {k: v.detach().clone() for k, v in spec.base_tensors().items()}
        self.merged: list[str] = []

    def _round(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.spec.dtype)

    def _delta(self, name: str) -> dict[str, torch.Tensor]:
        """The planted delta ``(1 + eps) s B A``, not yet rounded to the dtype. For float64 it is
        formed in extended precision (an ``eps`` below float64's half ulp would vanish otherwise)."""
        eps = self.error(self.spec, name)
        if self.spec.dtype != F64:
            return {k: d + eps * d for k, d in oracle.delta_weights(self.spec, name).items()}
        a = self.spec.adapter(name)
        d = _ld(a.scaling) * (_ld(a.B) @ _ld(a.A))
        out = {"weight": d + _ld(eps) * d}
        if a.bias is not None:
            lb = _ld(a.scaling) * _ld(a.bias)
            out["bias"] = lb + _ld(eps) * lb
        return out

    def forward(self, x: torch.Tensor, *, train: bool = False, adapter_names: Sequence[str] | None = None):
        if train or adapter_names is not None:
            raise Unsupported("planted target: eval forward only")
        spec = self.spec
        if self.merged:
            w = self.stored["weight"].to(F64)
            y = oracle._apply(spec, w, x.to(F64), False)
            if "bias" in self.stored:
                y = y + self.stored["bias"].to(F64)
            return self._round(y)
        if spec.dtype == F64:  # extended precision, then one rounding
            xl = _ld(x)
            y = xl @ _ld(spec.weight).T + (_ld(spec.base_bias) if spec.base_bias is not None else 0)
            for name in spec.active_adapters:
                a = spec.adapter(name)
                part = _ld(a.scaling) * ((xl @ _ld(a.A).T) @ _ld(a.B).T)
                if a.bias is not None:
                    part = part + _ld(a.scaling) * _ld(a.bias)
                y = y + part + _ld(self.error(spec, name)) * part
            return torch.from_numpy(y.astype(np.float64))
        y = oracle.forward(spec, x, adapters=[])
        for name in spec.active_adapters:
            part = oracle.forward(spec, x, adapters=[name]) - oracle.forward(spec, x, adapters=[])
            y = y + part + self.error(spec, name) * part
        return self._round(y)

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        for name in adapter_names or self.spec.active_adapters:
            if name in self.merged:
                continue
            for k, d in self._delta(name).items():
                self.stored[k] = self._round(_add(self.stored[k], d))
            self.merged.append(name)

    def merged_adapters(self) -> list[str]:
        return list(self.merged)

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(self.stored)

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        return {k: self._round(_add(None, d)) for k, d in self._delta(name).items()}

    def snapshot(self) -> dict[str, object]:
        return {**self.stored, "merged": list(self.merged)}

    def _lacks(self, *args, **kwargs):
        raise Unsupported("the planted target has only forward, merge, weights and delta_weights")

    unmerge = set_active = set_enabled = set_scale = scale_layer = unscale_layer = merge_and_unload = _lacks


class PlantedTarget:
    """A Linear-only target whose deltas carry a planted relative error."""

    def __init__(self, error: Callable[[LayerSpec, str], float], name: str = "planted"):
        self.error = error
        self.name = name

    def version(self) -> str:
        return "0"

    def capabilities(self) -> Capabilities:
        return Capabilities(
            layers=frozenset({"linear"}),
            dtypes=frozenset(DTYPES.values()),
            operations=frozenset({"merge", "delta_weight"}),
            options=frozenset({"multi_adapter", "rslora"}),
        )

    def build(self, spec: LayerSpec) -> PlantedHandle:
        return PlantedHandle(spec, self.error)


def scaled(eps: float) -> PlantedTarget:
    """Every delta times ``1 + eps``."""
    return PlantedTarget(lambda spec, name: eps, f"planted-eps-{eps:g}")


def storage_scaling() -> PlantedTarget:
    """``alpha / r`` rounded to the storage dtype before it multiplies ``B A``."""

    def error(spec: LayerSpec, name: str) -> float:
        s = spec.adapter(name).scaling
        return float(torch.tensor(s, dtype=spec.dtype).to(F64)) / s - 1

    return PlantedTarget(error, "planted-storage-scaling")


def run(target: PlantedTarget, prop: str, dtype: str, seed: int, with_bias: bool = True):
    """One ``ci`` cell (linear layer); the bias statistic switched off when ``with_bias`` is False."""
    opts = RunOptions(target=target.name, profile=PROFILES["ci"], seed=seed)
    saved = Context.check_bias
    if not with_bias:
        Context.check_bias = lambda self, tally: None
    try:
        return run_cell(target, all_properties()[prop], Cell(prop, "linear", dtype), opts)
    finally:
        Context.check_bias = saved


def flagged_by_bias(result) -> bool:
    return result.status == "failed" and "systematic error" in (result.message or "")


def scan(dtypes: Sequence[str], seed: int) -> dict:
    """Per dtype and property: the smallest eps each method flags, and what it did at each eps."""
    table: dict = {}
    for dtype in dtypes:
        u = unit_roundoff(DTYPES[dtype])
        for prop in PROPERTIES:
            rows = []
            for f in FACTORS:
                target = scaled(f * u)
                plain = run(target, prop, dtype, seed, with_bias=False)
                full = run(target, prop, dtype, seed)
                rows.append(
                    {
                        "eps": f * u,
                        "eps_over_u": f,
                        "elementwise": plain.status == "failed",
                        # A cell the bias test fails may end with an element-wise message: its
                        # shrink phase explores examples the plain run never drew.
                        "bias": flagged_by_bias(full)
                        or (full.status == "failed" and plain.status != "failed"),
                        "max_ratio": plain.max_ratio,
                        "bias_z": full.max_bias_z,
                    }
                )
            table.setdefault(dtype, {})[prop] = {
                "smallest_elementwise": next((r["eps"] for r in rows if r["elementwise"]), None),
                "smallest_bias": next((r["eps"] for r in rows if r["bias"]), None),
                "rows": rows,
            }
            t = table[dtype][prop]
            first = t["smallest_elementwise"], t["smallest_bias"]
            print(f"{dtype:9} {prop:18} smallest eps flagged: element-wise {first[0]}, bias {first[1]}")
    return table


def storage_scan(dtypes: Sequence[str], seed: int) -> dict:
    out = {}
    for dtype in dtypes:
        res = {prop: run(storage_scaling(), prop, dtype, seed) for prop in PROPERTIES}
        out[dtype] = {
            p: {"status": r.status, "bias": flagged_by_bias(r), "bias_z": r.max_bias_z}
            for p, r in res.items()
        }
        print(
            f"{dtype:9} alpha/r in the storage dtype: " + ", ".join(f"{p} {r.status}" for p, r in res.items())
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="float64,float32,bfloat16,float16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    dtypes = args.dtypes.split(",")
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = {
        "profile": "ci",
        "seed": args.seed,
        "layer": "linear",
        "factors_of_u": list(FACTORS),
        "scaled_delta": scan(dtypes, args.seed),
        "storage_scaling": storage_scan([d for d in dtypes if d in ("bfloat16", "float16")], args.seed),
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
