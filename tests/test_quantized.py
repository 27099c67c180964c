"""Quantized bases: the model holds for a correct quantized merge and catches broken ones.

Needs bitsandbytes (the ``quant`` extra; ``.ci/run`` installs it). The quantized reference
(``properties/targets/quantized_reference.py``: bnb's own quantizer, exact float64 between dequantize
and quantize) must pass every quantized property; each mutant in ``tests/quant_mutants.py`` must fail
its cell with a shrunk example and a replay command.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

pytest.importorskip("bitsandbytes")

from properties.catalogue import all_properties  # noqa: E402
from properties.profiles import PROFILES  # noqa: E402
from properties.quantized import model, tolerance  # noqa: E402
from properties.quantized.checks import QUANTIZED  # noqa: E402
from properties.results import CellResult, RunHeader, RunReport, Sample  # noqa: E402
from properties.runner import Cell, RunOptions, run_cell  # noqa: E402
from properties.spec import LayerSpec, QuantSpec  # noqa: E402
from properties.targets.quantized_reference import TARGET, quantize  # noqa: E402
from tests.quant_mutants import QUANT_MUTANTS  # noqa: E402

PROPS = all_properties()


def _run(target, cell: Cell, max_examples: int | None = 6) -> CellResult:
    opts = RunOptions(target=target.name, profile=PROFILES["ci"], seed=0, max_examples=max_examples)
    return run_cell(target, PROPS[cell.property], cell, opts)


REFERENCE_CELLS = [
    Cell(p, layer, dtype)
    for p in QUANTIZED
    for layer, dtype in (("bnb_nf4", "float32"), ("bnb_fp4", "bfloat16"), ("bnb_int8", "float32"))
]


REFERENCE_CELLS += [
    Cell(p, "torchao_int8", "bfloat16")
    for p in ("reference_forward", "merge_equivalence", "merge_cycle_drift", "safe_merge_atomic")
]


REFERENCE_CELLS += [Cell(p, "hqq_4bit", "bfloat16") for p in QUANTIZED] + [
    Cell(p, layer, dtype)
    for p in ("merge_equivalence", "merge_roundtrip", "merge_cycle_drift")
    for layer, dtype in (
        ("hqq_8bit", "float16"),
        ("hqq_3bit", "float32"),
        ("hqq_2bit", "bfloat16"),
        ("hqq_1bit", "float32"),
    )
]


REFERENCE_CELLS += [Cell(p, "torchao_nf4", "bfloat16") for p in QUANTIZED] + [
    Cell(p, "torchao_nf4", dtype)
    for p in ("merge_equivalence", "merge_cycle_drift")
    for dtype in ("float32", "float16")
]


def _need_nf4() -> None:
    from properties.targets._nf4_state import nf4_module
    from properties.targets.protocol import Unsupported

    try:
        nf4_module()
    except Unsupported as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("cell", REFERENCE_CELLS, ids=str)
def test_quantized_reference_passes(cell: Cell) -> None:
    if cell.layer.startswith("torchao"):
        pytest.importorskip("torchao")
    if cell.layer == "torchao_nf4":
        _need_nf4()
    if cell.layer.startswith("hqq"):
        pytest.importorskip("hqq")
    result = _run(TARGET, cell)
    assert result.status == "passed", f"{cell}: {result.status}: {result.message}\n{result.example}"
    assert result.examples > 0
    assert result.max_ratio is None or result.max_ratio <= 1.0  # state-only properties record no ratio


@pytest.mark.parametrize("mutant", list(QUANT_MUTANTS.values()), ids=lambda m: m.name)
def test_quantized_mutant_is_caught(mutant) -> None:
    if mutant.layer.startswith("hqq"):
        pytest.importorskip("hqq")
    if mutant.layer == "torchao_nf4":
        _need_nf4()
    target = mutant.target()
    result = _run(target, Cell(mutant.property, mutant.layer, mutant.dtype), mutant.max_examples or 12)
    assert result.status == "failed", f"{mutant.name} -> {result.status}: {result.message}"
    assert result.example and f"kind='{mutant.layer}'" in result.example
    assert result.replay and f"--layers {mutant.layer}" in result.replay


def _spec(kind: str, shape=(8, 24), block: int = 32, dq: bool = True, seed: int = 0) -> LayerSpec:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(torch.float32)
    q = QuantSpec(kind, 8 if kind == "bnb_int8" else 4, 0 if kind == "bnb_int8" else block, dq)
    return LayerSpec("linear", torch.float32, w, (), quant=q)


def test_decode_matches_torchao() -> None:
    """The canonical decode of torchao's Int8Tensor equals its own dequantize."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from properties.targets._torchao_state import torchao_int8_state

    layer = torch.nn.Sequential(torch.nn.Linear(24, 8, bias=False))
    quantize_(layer, Int8WeightOnlyConfig())
    w = layer[0].weight
    torch.testing.assert_close(
        torchao_int8_state(w).decode(), w.dequantize().to(torch.float64), rtol=2 * 2**-24, atol=0.0
    )  # torchao rounds the product to float32


@pytest.mark.parametrize("kind", ["bnb_nf4", "bnb_fp4", "bnb_int8"])
def test_decode_matches_bitsandbytes(kind: str) -> None:
    """The canonical decode of the stored codes equals bnb's own dequantize (up to its float32)."""
    import bitsandbytes.functional as bf

    spec = _spec(kind, dq=True)
    qs = quantize(spec, spec.weight.to(torch.float64))
    if kind == "bnb_int8":
        q, s, _ = bf.int8_vectorwise_quant(spec.weight.to(torch.float16))
        theirs = bf.int8_vectorwise_dequant(q, s)
    else:
        p, st = bf.quantize_4bit(spec.weight, blocksize=32, quant_type=kind[4:], compress_statistics=True)
        theirs = bf.dequantize_4bit(p, st)
    torch.testing.assert_close(qs.decode(), theirs.to(torch.float64), rtol=4 * 2**-24, atol=0.0)


@pytest.mark.parametrize("kind", ["bnb_nf4", "bnb_fp4", "bnb_int8"])
@pytest.mark.parametrize("dq", [False, True])
def test_requant_bound_holds_and_is_tight(kind: str, dq: bool) -> None:
    """bnb's quantizer lands within the bound; the bound is nearly attained (ratio close to 1);
    a code one step off (or an old scale) breaks it."""
    spec = _spec(kind, dq=dq, seed=3)
    v = spec.weight.to(torch.float64) * 1.37
    qs = quantize(spec, v)
    delta = (qs.input_roundoff + 3 * model.U32) * v.abs()
    err = (qs.decode() - v).abs()
    bound = model.requant_bound(qs, v, delta)
    assert (err <= bound).all()
    assert float((err / bound).max()) > 0.5
    scales = model.scale_expected(qs, v, delta)
    assert ((qs.scale - scales.exact).abs() <= scales.bound).all()
    stale = quantize(spec, spec.weight.to(torch.float64))  # the old scales
    assert ((stale.scale - scales.exact).abs() > scales.bound).any()


def test_cycle_bound_grows_linearly() -> None:
    """n merge/unmerge cycles: each requantization adds its own bound (the model's claim), so the
    drift may grow linearly with n; bnb's quantizer stays within it, and does drift."""
    spec = _spec("bnb_nf4", shape=(4, 64), dq=False, seed=5)
    qs0 = quantize(spec, spec.weight.to(torch.float64))
    d = 0.05 * torch.randn((4, 64), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    qs, drift = qs0, []
    for _ in range(10):
        qs = quantize(spec, quantize(spec, qs.decode() + d).decode() - d)
        drift.append(float((qs.decode() - qs0.decode()).abs().max()))
    step = model.gap_max(qs0.codebook) * float(qs0.scale.max())
    assert drift[-1] <= 10 * 2 * step
    assert max(drift) > 0  # requantizing twice is not exact


def test_tolerance_rows() -> None:
    s = Sample(0.5, math.nan, 8, 2, "merge shift [nf4 b64]", error=0.1, bound=0.2, reference=0.5)
    cell = CellResult("merge_equivalence", "bnb_nf4", "float32", "passed", samples=[s])
    header = RunHeader(**{f: None for f in RunHeader.__dataclass_fields__})
    rows = tolerance.rows(RunReport(header, [cell]))
    assert rows == [
        {
            "quantizer": "nf4 b64",
            "dtype": "float32",
            "examples": 1,
            "max_shift": 0.1,
            "max_shift_over_lora": 0.2,
            "median_shift_over_lora": 0.2,
            "max_bound": 0.2,
            "max_ratio": 0.5,
        }
    ]


def _hqq_spec(bits: int, group: int, shape, optimize: bool, dtype=torch.float32, seed: int = 0) -> LayerSpec:
    g = torch.Generator().manual_seed(seed)
    w = (0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    return LayerSpec(
        "linear", dtype, w, (), quant=QuantSpec(f"hqq_{bits}bit", bits, group, optimize=optimize)
    )


HQQ_CASES = [
    (bits, group, shape, opt, dtype)
    for bits, group, shape in ((8, 16, (4, 12)), (4, 8, (2, 24)), (3, 32, (8, 8)), (2, 16, (8, 16)))
    for opt in (False, True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
]


@pytest.mark.parametrize("bits,group,shape,opt,dtype", HQQ_CASES)
def test_hqq_decode_and_requant_bound(bits, group, shape, opt, dtype) -> None:
    """The canonical decode equals HQQ's own dequantize (two roundings in the compute dtype); HQQ's
    quantizer lands within the grid-only bound, nearly attains it, and stores the min/max scale;
    a grid kept from other weights (the old scale) fails the scale check."""
    pytest.importorskip("hqq")
    from properties.precision import UNIT_ROUNDOFF
    from properties.targets._hqq_state import hqq_modules, hqq_state, quant_config

    spec = _hqq_spec(bits, group, shape, opt, dtype)
    v = spec.weight.to(torch.float64) * 1.37
    qs = quantize(spec, v)
    assert qs.format == spec.quant.label and qs.scale_rule == "minmax"
    hqq_linear, _ = hqq_modules()
    layer = hqq_linear(None, quant_config(spec.quant), compute_dtype=dtype, device="cpu")
    cfg = quant_config(spec.quant)
    cfg.pop("offload_meta")
    layer.quantize(v, **cfg)
    assert torch.equal(hqq_state(layer).codes, qs.codes)
    decoded = qs.decode()
    rel = model.dequant_rounding(qs, UNIT_ROUNDOFF[dtype])
    assert ((layer.dequantize().to(torch.float64) - decoded).abs() <= rel * decoded.abs()).all()
    delta = (qs.input_roundoff + 3 * model.U32) * v.abs()
    err, bound = (decoded - v).abs(), model.requant_bound(qs, v, delta)
    assert (err <= bound).all()
    # A zero stored in half precision shifts the grid by up to u |z| s, counted twice (worst case).
    assert float((err / bound).max()) > (0.5 if dtype == torch.float32 else 0.3)
    scales = model.scale_expected(qs, v, delta)
    assert ((qs.scale - scales.exact).abs() <= scales.bound).all()
    stale = quantize(spec, spec.weight.to(torch.float64))  # min/max of other weights
    assert ((stale.scale - scales.exact).abs() > scales.bound).any()


def test_hqq_chain_bound_holds() -> None:
    """Three adapters requantized one after the other (min/max zero): the final weights stay within
    the bound that adds the unobserved intermediate steps; with the optimiser no bound is claimed."""
    pytest.importorskip("hqq")
    from properties.precision import Arithmetic
    from properties.spec import AdapterSpec

    arith = Arithmetic.for_dtype(torch.float32)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        adapters = tuple(
            AdapterSpec(n, 2, 1.0, 0.3 * torch.randn(2, 8, generator=g), torch.randn(4, 2, generator=g))
            for n in ("default", "other", "third")
        )
        spec = replace(_hqq_spec(4, 8, (4, 8), False, seed=seed), adapters=adapters)
        qs0 = quantize(spec, spec.weight.to(torch.float64))
        qs = qs0
        for a in adapters:
            qs = quantize(spec, qs.decode() + a.scaling * (a.B.double() @ a.A.double()))
        exp, _, bound = model.merged_weight_expected(spec, qs0, qs, spec.adapter_names, arith)
        assert ((qs.decode() - exp.exact).abs() <= bound).all()
        with pytest.raises(model.NoChainBound):
            model.merged_weight_expected(
                spec, replace(qs0, zero_optimised=True), qs, spec.adapter_names, arith
            )


def test_hqq_strategy_draws_shapes_that_fit() -> None:
    """Every drawn HQQ example has a weight size HQQ can pack, and one adapter when optimising."""
    pytest.importorskip("hqq")
    from hypothesis import given, settings

    from properties.strategies import Draw, examples
    from properties.targets._hqq_state import check_shape

    seen = set()

    @settings(max_examples=60, database=None, deadline=None)
    @given(examples(Draw(kind="hqq_2bit", dtype=torch.float32, options=frozenset({"multi_adapter"}))))
    def check(ex) -> None:
        q = ex.spec.quant
        check_shape(tuple(ex.spec.weight.shape), q.block, q.bits)
        assert not q.optimize or len(ex.spec.adapters) == 1
        seen.add((q.block, q.optimize, ex.spec.weight.shape[1] % q.block != 0))

    check()
    assert len({b for b, _, _ in seen}) > 2 and any(cross for _, _, cross in seen)


PEFT_CELLS = [Cell(p, "bnb_nf4", "float32") for p in ("reference_forward", "merge_equivalence")]
PEFT_CELLS += [Cell(p, "hqq_4bit", "bfloat16") for p in ("reference_forward", "merge_cycle_drift")]


@pytest.mark.parametrize("cell", PEFT_CELLS, ids=str)
def test_peft_quantized_cells_pass(cell: Cell) -> None:
    """PEFT's Linear4bit, reached through transformers' BitsAndBytesConfig, passes the model."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from properties.targets.peft_target import TARGET as PEFT

    result = _run(PEFT, cell, 4)
    assert result.status == "passed", f"{cell}: {result.status}: {result.message}"


def test_peft_declares_hqq_by_feature() -> None:
    """PEFT's HQQ kinds are detected by feature; a LoRA bias on them is drawn only where
    HqqLoraLinear takes one (0.21.2 refuses it: a note says why)."""
    pytest.importorskip("hqq")
    pytest.importorskip("peft")
    from properties.spec import HQQ_KINDS
    from properties.targets.peft_target import TARGET as PEFT

    caps = PEFT.capabilities()
    assert set(HQQ_KINDS) <= caps.layers
    assert ("hqq_lora_bias" in caps.options) != ("hqq_lora_bias" in caps.notes)
    assert "hqq_lora_bias" in TARGET.capabilities().options  # the quantized reference merges one


# -- torchao NF4 (torchtune's QLoRA base) -------------------------------------------------------------


NF4_CASES = [
    (64, 256, (128, 128), torch.bfloat16),
    (64, 256, (64, 256), torch.float32),
    (32, 16, (16, 32), torch.float16),
    (16, 4, (8, 32), torch.bfloat16),
    (16, 64, (32, 32), torch.float32),
]


def _nf4_spec(block: int, scale_block: int, shape, dtype, seed: int = 0) -> LayerSpec:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    q = QuantSpec("torchao_nf4", 4, block, True, scale_block=scale_block)
    return LayerSpec("linear", dtype, w, (), quant=q)


@pytest.mark.parametrize("block,scale_block,shape,dtype", NF4_CASES)
def test_nf4_decode_and_requant_bound(block, scale_block, shape, dtype) -> None:
    """The canonical decode equals torchao's own dequantize (one rounding in the dtype); torchao's
    quantizer lands within the requantization bound, nearly attaining it, and its double-quantized
    scales within the scale bound; the scales of the unscaled weight (stale) are rejected."""
    _need_nf4()
    from properties.precision import UNIT_ROUNDOFF
    from properties.targets._nf4_state import nf4_module, nf4_state

    spec = _nf4_spec(block, scale_block, shape, dtype, seed=5)
    w = spec.weight.contiguous()
    nf4 = nf4_module().to_nf4(w, block_size=block, scaler_block_size=scale_block)
    qs = nf4_state(nf4)
    assert qs.format == f"torchao nf4 b{block} s{scale_block}"
    u = UNIT_ROUNDOFF[dtype]
    theirs = nf4.get_original_weight().to(torch.float64)
    assert ((qs.decode() - theirs).abs() <= u * qs.decode().abs()).all()
    v = spec.weight.to(torch.float64) * 1.37
    qv = quantize(spec, v)
    delta = (qv.input_roundoff + 3 * model.U32) * v.abs()
    err = (qv.decode() - v).abs()
    bound = model.requant_bound(qv, v, delta)
    assert (err <= bound).all()
    assert float((err / bound).max()) > 0.5
    scales = model.scale_expected(qv, v, delta)
    assert ((qv.scale - scales.exact).abs() <= scales.bound).all()
    assert ((qs.scale - scales.exact).abs() > scales.bound).any()  # the scales of W, not 1.37 W


def test_nf4_double_quant_clamp_is_a_whole_step() -> None:
    """torchao codes the largest scale deviation as 128 and clamps it to 127: one whole step of
    ``max|a - m| / 128`` off, which the scale bound must allow (half a step would not)."""
    _need_nf4()
    from properties.targets._nf4_state import nf4_module, nf4_state

    spec = _nf4_spec(16, 4, (8, 32), torch.float32, seed=1)
    qs = nf4_state(nf4_module().to_nf4(spec.weight.contiguous(), block_size=16, scaler_block_size=4))
    absmax = model._blocks(qs, spec.weight.to(torch.float64)).abs().max(dim=1).values
    dev = absmax - absmax.mean()
    groups = dev.reshape(-1, 4)
    top = groups.argmax(dim=1) + torch.arange(groups.shape[0]) * 4
    spread = groups.abs().max(dim=1).values
    off = (qs.scale - absmax).abs()[top]
    assert (off > 0.9 * spread / 128).any()  # the clamped ones are off by about a whole step
    exp = model.scale_expected(
        qs, spec.weight.to(torch.float64), torch.zeros(spec.weight.shape, dtype=torch.float64)
    )
    assert ((qs.scale - exp.exact).abs() <= exp.bound).all()


def test_nf4_strategy_draws_shapes_torchao_takes() -> None:
    """Every drawn NF4 example has a weight of a multiple of block_size * scaler_block_size elements,
    and the default blocks (64, 256) are drawn too."""
    from hypothesis import HealthCheck, given, settings

    from properties.quantized.strategies import quantized_examples
    from properties.strategies import Draw

    seen = set()

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(quantized_examples(Draw("torchao_nf4", torch.float32, frozenset({"quant_blocksize"}))))
    def check(ex) -> None:
        q = ex.spec.quant
        assert ex.spec.weight.numel() % (q.block * q.scale_block) == 0
        assert q.block % 2 == 0 and max(ex.spec.weight.shape) <= 128
        seen.add((q.block, q.scale_block))

    check()
    assert (64, 256) in seen and len(seen) > 1


def test_float_export_reference_passes() -> None:
    """A correct float export (torchtune's kind of QLoRA merge) passes the quantized properties it
    can run; its bfloat16-routed mutant is ``tests/quant_mutants.py`` ``nf4_export_via_bf16``."""
    _need_nf4()
    from tests.quant_mutants import FloatExportReference, FloatExportTarget

    target = FloatExportTarget()
    target.handle = FloatExportReference
    target.name = "quantized-reference-float-export"
    for p in ("reference_forward", "merge_equivalence", "merge_idempotent", "disable_exact"):
        for dtype in ("float32", "bfloat16"):
            result = _run(target, Cell(p, "torchao_nf4", dtype))
            assert result.status == "passed", (
                f"{p} {dtype}: {result.status}: {result.message}\n{result.example}"
            )
            assert result.examples > 0
