"""Systematic error below the rounding: a sign-flip test on the signed errors of a comparison.

An element-wise bound sees an error only once it passes a few units of roundoff. A defect that moves
every element the same way by less than that (``alpha / r`` kept in bfloat16, a delta scaled in one
dtype and added in another, a delta always rounded toward zero) never does; summed over the
thousands of elements of a cell it stands far out of the rounding noise.

**Statistic.** For one comparison: the target's values ``a``, a *candidate* ``c`` (what a correct
implementation computes, emulated exactly from the same inputs with its roundings to the dtype; see
below) and the direction ``D`` in which a scaling error of the LoRA delta moves the result (the exact
delta, or the exact LoRA part of an output). Each *block* ``b`` of elements gives

    X_b = sum_{i in b} (a_i - c_i) D_i / sum_i D_i^2          (second sum: the whole comparison)

so that ``sum_b X_b`` is the least-squares estimate of the relative scaling error ``eps`` of the delta.
A block holds the elements that share a stored rounded value: one element for weights; for outputs
one position (every output feature), since the rounded ``A x`` is shared by all features of a row.

**Null hypothesis** (a correct implementation that rounds as candidate ``c``, up to the order of its
accumulations): the ``X_b`` are independent and symmetric about 0, the probabilistic model of rounding
errors (Higham & Mary 2019). Given the ``|X_b|``, their signs are then independent fair signs, and
Hoeffding's inequality for ``sum_b sign_b |X_b|`` gives

    P( |sum_b X_b| >= z sqrt(sum_b X_b^2) ) <= 2 exp(-z^2 / 2).

With ``z* = sqrt(2 ln(2 / FALSE_ALARM))`` (5.64 for 2.5e-7) a test fires with probability at most
``FALSE_ALARM``. The verdict fires only when the test fires against every candidate that explains the
target (differs from it in at most ``x + 4 sqrt(x) + SLACK`` blocks, ``x`` the fewest of any candidate), so if
the target rounds like one of those its false-alarm probability is at most that one test's: no
Bonferroni factor over candidates. (A correct target differs from its own sequence only where
accumulation order breaks a tie the other way; a candidate with many more differences is another
sequence, whose noise would only hide a bias.)
A comparison (one example) is one test; a cell pools its examples into a second test per quantity,
with the same rate, which is how examples too small to reach ``z*`` alone still add up.

**The pool counts each rounding event once.** A cell's examples are not independent draws: tensors
are filled from a seed, and Hypothesis mutates an example's other choices (alpha, a power-of-two
magnitude, a switch) while keeping its seed, so many examples hold the very same ``A`` and ``B`` and
round the very same ``B A`` (thorough, seed 3, ``reference_delta embedding float32``: 807 comparisons
from 34 seeds). Adding them as independent blocks counts one rounding event many times: a float32
matmul's accumulation error, symmetric over seeds, looked like a bias of z = -6.6. So
:class:`BiasPool` sums the blocks of the examples that share a seed position by position into one
block before the test. Merging blocks keeps the test valid (a sum of blocks is as symmetric as its
parts), and examples from different seeds are independent draws.

**Candidates: calibrated against correct rounding, not against zero.** Correct rounding is not
unbiased everywhere: ``W + delta`` with ``|delta|`` below half an ulp of ``W`` rounds back to ``W``, an
error of exactly ``-delta`` every time, perfectly aligned with ``D``. Each candidate reproduces one
rounding sequence a correct implementation may use (``round(W + round(delta))``, ``round(W + delta)``,
``round(round(B A) * s)``, the scaling as a float32 scalar as torch applies a Python float, the
sequential ``round(round(W x + b) + round(s round(B round(A x))))`` or one final rounding), so such
errors are in ``c`` and cancel in ``a - c``. DoRA (its norm is one rounded value shared by a whole row)
and attention (the softmax couples every output) break the independence and are left out.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from properties import oracle
from properties.spec import LayerSpec

FALSE_ALARM = 2.5e-7
"""Per test. An example takes part in at most four tests (``reference_delta``: one per adapter, up
to three, and the cell's; ``merge_equivalence``: two and two cell tests), so its false-alarm rate is
at most 1e-6."""
Z_THRESHOLD = math.sqrt(2 * math.log(2 / FALSE_ALARM))
SLACK = 16
"""Blocks a candidate may differ in beyond the best one's (plus four standard deviations of that
count) and still count as an explanation: ties that accumulation noise breaks the other way."""
F64 = torch.float64


def z_score(s: float, q: float) -> float:
    """``sum X / sqrt(sum X^2)``; 0 when every block agrees exactly with the candidate."""
    return s / math.sqrt(q) if q > 0 else 0.0


@dataclass
class BiasTally:
    """One quantity's test: per candidate, the blocks ``X_b`` (``x``) and how many differ from it."""

    quantity: str
    x: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    n: dict[str, int] = field(default_factory=dict)  # blocks that differ from the candidate
    blocks: int = 0
    comparisons: int = 0  # examples x tensors compared (one per adapter for deltas)

    def add(self, other: BiasTally) -> None:
        """Append ``other``'s blocks (another tensor of the same example): a candidate one part
        lacks contributes nothing there."""
        for k in self.x.keys() | other.x.keys():
            mine = self.x.get(k, torch.zeros(self.blocks, dtype=F64))
            self.x[k] = torch.cat([mine, other.x.get(k, torch.zeros(other.blocks, dtype=F64))])
        for k, v in other.n.items():
            self.n[k] = self.n.get(k, 0) + v
        self.blocks += other.blocks
        self.comparisons += other.comparisons

    def sums(self, name: str) -> tuple[float, float]:
        """``(s, q) = (sum X_b, sum X_b^2)`` against candidate ``name``."""
        x = self.x[name]
        return float(x.sum()), float((x * x).sum())

    def verdict(self) -> tuple[str, float, float]:
        """The candidate the target follows, its z (signed) and the mean estimate of ``eps``.

        The candidates that explain the target are kept: those differing from it in at most
        ``x + 4 sqrt(x) + SLACK`` blocks, ``x`` the fewest of any (four standard deviations of a count).
        A candidate that disagrees in many more blocks than another is not the sequence the target
        uses, and its noise would only hide a bias. The test fires when ``|z| > Z_THRESHOLD``
        against every kept candidate."""
        fewest = min(self.n.values())
        kept = [k for k in self.x if self.n[k] <= fewest + 4 * math.sqrt(fewest) + SLACK]
        sums = {k: self.sums(k) for k in kept}
        name = min(kept, key=lambda k: abs(z_score(*sums[k])))
        s, q = sums[name]
        return name, z_score(s, q), s / max(self.comparisons, 1)

    def summary(self) -> dict[str, float | int | str]:
        name, z, eps = self.verdict()
        return {"z": z, "eps": eps, "candidate": name, "blocks": self.blocks, "comparisons": self.comparisons}


def tally(
    quantity: str,
    actual: torch.Tensor,
    candidates: dict[str, torch.Tensor],
    direction: torch.Tensor,
    block_dim: int | None = None,
    blocks: torch.Tensor | None = None,
) -> BiasTally | None:
    """One comparison's sums against each candidate; ``block_dim``: the dimension summed into a
    block (output features), None for element blocks. None when there is nothing to test: no
    direction (a zero delta) or non-finite values (the element-wise check owns those)."""
    a = actual.detach().to("cpu", F64)
    norm = float((direction * direction).sum())
    if norm == 0.0 or not torch.isfinite(a).all() or a.shape != direction.shape:
        return None
    out = BiasTally(quantity, comparisons=1)
    for name, c in candidates.items():
        x = (a - c) * direction / norm
        if block_dim is not None and x.dim() > 0:
            x = x.sum(block_dim)
        if blocks is not None:  # positions that repeat one input window are one rounding event
            x = torch.zeros(int(blocks.max()) + 1, dtype=F64).index_add_(0, blocks.flatten(), x.flatten())
        out.x[name] = x.flatten()
        out.n[name] = int((x != 0).sum())
        out.blocks = x.numel()
    return out


@dataclass
class BiasPool:
    """A cell's test of one quantity: its examples' blocks, those of examples that share a seed (and
    so their tensors and rounding events) summed position by position into one block."""

    quantity: str
    groups: dict[Hashable, BiasTally] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)
    comparisons: int = 0

    def add(self, t: BiasTally, group: Hashable) -> None:
        """``group``: what determines the example's values (its seed)."""
        pooled = self.groups.setdefault(group, BiasTally(self.quantity))
        size = max(pooled.blocks, t.blocks)
        for k in pooled.x.keys() | t.x.keys():
            x = torch.zeros(size, dtype=F64)
            for part in (pooled.x.get(k), t.x.get(k)):
                if part is not None:
                    x[: part.numel()] += part
            pooled.x[k] = x
        pooled.blocks = size
        for k, v in t.n.items():
            self.n[k] = self.n.get(k, 0) + v
        self.comparisons += t.comparisons

    def tally(self) -> BiasTally:
        """The pooled test, one block per distinct (seed, position)."""
        out = BiasTally(self.quantity)
        for pooled in self.groups.values():
            out.add(pooled)
        out.n, out.comparisons = dict(self.n), self.comparisons
        return out


def combine(tallies: Sequence[BiasTally | None]) -> BiasTally | None:
    """One example's comparisons of the same quantity (several tensors, adapters) as one test."""
    found = [t for t in tallies if t is not None]
    if not found:
        return None
    out = BiasTally(found[0].quantity)
    for t in found:
        out.add(t)
    out.comparisons = 1
    return out


def weight_tally(
    quantity: str,
    actual: dict[str, torch.Tensor],
    candidates: dict[str, dict[str, torch.Tensor]],
    directions: dict[str, torch.Tensor],
) -> BiasTally | None:
    """Weights (element blocks), every key the candidates cover."""
    return combine(
        [tally(quantity, actual[k], candidates[k], directions[k]) for k in candidates if k in actual]
    )


# ----------------------------------------------------------------------------- emulated rounding


def rounder(dtype: torch.dtype):
    """Round float64 values to ``dtype`` (to nearest even) and back: an exact emulation of a store."""
    return lambda t: t.to(dtype).to(F64)


def _s32(s: float) -> float:
    """A Python float scaling as torch applies it to a float32/half tensor (a float32 scalar)."""
    return float(torch.tensor(s, dtype=torch.float32))


def _scalings(spec: LayerSpec, s: float) -> dict[str, float]:
    if spec.dtype == F64:
        return {"": s}
    return {"": s, " (float32 s)": _s32(s)}


def _units(spec: LayerSpec, name: str) -> dict[str, tuple[torch.Tensor, float]]:
    """Per delta key: ``B A`` (unscaled, canonical layout) and its scaling."""
    a = spec.adapter(name)
    if spec.kind == "mha":
        units = {
            "in_proj_weight": oracle._t(a.B, False) @ oracle._t(a.A, False),
            "out_proj.weight": oracle._t(a.out_B, False) @ oracle._t(a.out_A, False),
        }
    else:
        units = {"weight": oracle.lora_product(spec, a)}
    if a.bias is not None:
        units["bias"] = oracle._t(a.bias, False)
    return {k: (v, a.scaling) for k, v in units.items()}


def delta_candidates(spec: LayerSpec, name: str) -> dict[str, dict[str, torch.Tensor]]:
    """Per delta key, the deltas a correct implementation stores: ``round(s B A)``, with ``s`` as a
    float32 scalar, with ``B A`` rounded first (a delta formed in the storage dtype), and for a Linear
    with the scaling applied to one factor first (torchtune's ``(alpha / rank) * lora_b @ lora_a`` is
    ``round(round(s B) A)``): that rounding is shared by a whole row (or column) of the delta, so
    without its candidate a correct merge looks biased along the delta."""
    r = rounder(spec.dtype)
    a = spec.adapter(name)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, (unit, s) in _units(spec, name).items():
        cands = {}
        for label, sv in _scalings(spec, s).items():
            cands[f"round(s B A){label}"] = r(sv * unit)
            cands[f"round(round(B A) s){label}"] = r(r(unit) * sv)
            if spec.kind == "linear" and key == "weight":
                A, B = oracle._t(a.A, False), oracle._t(a.B, False)
                cands[f"round(round(s B) A){label}"] = r(r(sv * B) @ A)
                cands[f"round(B round(s A)){label}"] = r(B @ r(sv * A))
        out[key] = cands
    return out


def merged_candidates(spec: LayerSpec, names: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Per weight key, the merged weights after merging ``names`` in order: ``round(W + delta)`` with
    the exact delta (formed in a wider dtype) or ``round(W + round(delta))`` for each stored delta."""
    r = rounder(spec.dtype)
    base = {k: oracle._t(v, False) for k, v in spec.base_tensors().items()}
    deltas = {n: delta_candidates(spec, n) for n in names}
    exact = {n: {k: u * s for k, (u, s) in _units(spec, n).items()} for n in names}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key in base:
        touched = [n for n in names if key in exact[n]]
        if not touched:
            continue
        labels = list(deltas[touched[0]][key])
        out[key] = {}
        for label in [None, *labels]:
            w = base[key]
            for n in touched:
                w = r(w + (exact[n][key] if label is None else deltas[n][key][label]))
            out[key]["round(W + s B A)" if label is None else f"round(W + {label})"] = w
    return out


def _lora_hidden(spec: LayerSpec, name: str, x: torch.Tensor) -> torch.Tensor:
    """``A x`` in float64 (the value an implementation rounds and shares across output features)."""
    a = spec.adapter(name)
    A = oracle._t(a.A, False)
    return oracle._apply(spec, A.T if spec.kind == "embedding" else A, x, False)


def _lora_up(spec: LayerSpec, name: str, h: torch.Tensor) -> torch.Tensor:
    """``B h`` for a hidden ``h`` from :func:`_lora_hidden` (a 1x1 grouped conv for conv layers)."""
    B = oracle._t(spec.adapter(name).B, False)
    if spec.kind in ("linear", "embedding"):
        return h @ B.T
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[B.dim()]
    return conv(h, B, groups=spec.conv.groups)


def feature_dim(spec: LayerSpec) -> int:
    """The output-feature dimension of an output: a block is every feature at one position."""
    return -1 if spec.kind in ("linear", "embedding") else 1


def applies(spec: LayerSpec, names: Sequence[str]) -> bool:
    """The test's independence holds: no attention, no DoRA."""
    return spec.kind != "mha" and not any(spec.adapter(n).use_dora for n in names)


def unmerged_candidates(spec: LayerSpec, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Unmerged eval outputs of a correct implementation: PEFT's sequence ``y = round(W x + b)``, then
    per adapter ``t = round(round(B round(A x)) s)`` (``+ round(s b_lora)``, rounded) and
    ``y = round(y + t)``; or the exact output rounded once."""
    r = rounder(spec.dtype)
    xx = oracle._t(x, False) if x.is_floating_point() else x.to("cpu")
    out = {"round(y)": r(oracle.forward(spec, x))}
    for label, pick in (("", lambda s: s), (" (float32 s)", _s32)):
        if label and spec.dtype == F64:
            continue
        y = oracle._apply(spec, oracle._t(spec.weight, False), xx, False)
        if spec.base_bias is not None:
            y = y + oracle._out_view(spec, oracle._t(spec.base_bias, False), y.dim())
        y = r(y)
        for name in spec.active_adapters:
            a = spec.adapter(name)
            s = pick(a.scaling)
            t = r(r(_lora_up(spec, name, r(_lora_hidden(spec, name, xx)))) * s)
            if a.bias is not None:
                t = r(t + oracle._out_view(spec, r(oracle._t(a.bias, False) * s), t.dim()))
            y = r(y + t)
        out[f"sequential{label}"] = y
    return out


def merged_output_candidate(
    spec: LayerSpec, x: torch.Tensor, weights: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The forward of the target's own merged weights, rounded once: what is left is the forward's
    own rounding (the merge has its own test on the weights)."""
    xx = oracle._t(x, False) if x.is_floating_point() else x.to("cpu")
    w = weights["weight"].detach().to("cpu", F64)
    y = oracle._apply(spec, w, xx, False)
    if "bias" in weights and weights["bias"] is not None:
        y = y + oracle._out_view(spec, weights["bias"].detach().to("cpu", F64), y.dim())
    return rounder(spec.dtype)(y)


def position_blocks(spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    """A block id per output position: positions whose input windows coincide (a repeated embedding
    index, a reflected or replicated conv border, equal rows) compute the same values and round the
    same way, so they are one block, not several independent ones. Windows are compared through a
    random float64 projection of each (per conv group); positions sharing any group's window merge."""
    g = torch.Generator().manual_seed(0)
    if spec.kind == "embedding":
        prints = [x.to("cpu", F64)]
    elif spec.kind == "linear":
        xx = x.detach().to("cpu", F64)
        prints = [xx @ torch.randn(xx.shape[-1], generator=g, dtype=F64)]
    else:
        groups = spec.conv.groups
        w = torch.randn(groups, *spec.weight.shape[1:], generator=g, dtype=F64)
        xx = x.detach().to("cpu", F64)
        c = spec.conv
        mode = "constant" if c.padding_mode == "zeros" else c.padding_mode
        xp = F.pad(xx, oracle.conv_padding(spec), mode=mode)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(c.kernel_size)]
        fp = conv(xp, w, stride=c.stride, dilation=c.dilation, groups=groups)
        prints = [fp[:, i] for i in range(groups)]
    shape = prints[0].shape
    parent = list(range(prints[0].numel()))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for p in prints:
        first: dict[float, int] = {}
        for i, v in enumerate(p.flatten().tolist()):
            j = first.setdefault(v, i)
            if j != i:
                parent[find(i)] = find(j)
    roots = torch.tensor([find(i) for i in range(len(parent))])
    return torch.unique(roots, return_inverse=True)[1].reshape(shape)


def lora_part(spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    """The exact LoRA contribution to the output: the direction a scaling error moves it."""
    return oracle.forward(spec, x) - oracle.forward(spec, x, adapters=[])
