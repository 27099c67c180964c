"""Running a cell leaves no trace in the process: a library's own test run must not change behaviour
because the conformance suite ran first (default dtype, RNG stream, grad mode, threads, oneDNN)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import torch

from properties.catalogue import all_properties
from properties.isolation import isolated, pinned_backend
from properties.profiles import PROFILES
from properties.runner import Cell, RunOptions, run_cell
from properties.spec import LayerSpec
from properties.targets.protocol import LayerHandle
from properties.targets.reference import TARGET, ReferenceTarget

PROPS = all_properties()


def _state() -> dict[str, object]:
    return {
        "dtype": torch.get_default_dtype(),
        "rng": torch.get_rng_state(),
        "grad": torch.is_grad_enabled(),
        "threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.enabled,
    }


def _assert_same(before: dict[str, object], after: dict[str, object]) -> None:
    assert after["dtype"] == before["dtype"]
    assert torch.equal(after["rng"], before["rng"]), "global RNG state changed"
    assert (after["grad"], after["threads"], after["mkldnn"]) == (
        before["grad"],
        before["threads"],
        before["mkldnn"],
    )


@pytest.fixture
def unusual_globals() -> Iterator[dict[str, object]]:
    """Values no cell would pick by itself, so a leak cannot hide behind a coincidence; restored after."""
    saved = _state()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(20240607)
    torch.set_grad_enabled(False)
    torch.set_num_threads(3)  # cells pin 1 thread
    torch.backends.mkldnn.enabled = True  # cells turn oneDNN off
    try:
        yield _state()
    finally:
        torch.set_default_dtype(saved["dtype"])
        torch.set_rng_state(saved["rng"])
        torch.set_grad_enabled(saved["grad"])
        torch.set_num_threads(saved["threads"])
        torch.backends.mkldnn.enabled = saved["mkldnn"]


def _run(target, prop: str, layer: str, dtype: str, n: int = 5):
    opts = RunOptions(target=target.name, profile=PROFILES["ci"], seed=0, max_examples=n)
    return run_cell(target, PROPS[prop], Cell(prop, layer, dtype), opts)


@pytest.mark.parametrize(
    ("prop", "layer", "dtype"),
    [
        ("train_dropout_unbiased", "linear", "float32"),  # consumes the global RNG (dropout masks)
        ("merge_equivalence", "conv2d", "bfloat16"),
        ("mixed_batch", "mha", "float32"),
        ("safe_merge_atomic", "linear", "float16"),
        pytest.param(  # whole transformers models, saved and loaded
            "model_merged_save_load",
            "llama_tied",
            "bfloat16",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("transformers") is None, reason="needs transformers"
            ),
        ),
    ],
)
def test_run_cell_leaves_globals_unchanged(unusual_globals: dict[str, object], prop, layer, dtype) -> None:
    """After a passing cell every global is as it was, and a second RNG draw continues the caller's
    stream exactly where it would have without the cell."""
    result = _run(TARGET, prop, layer, dtype)
    assert result.status == "passed", result.message
    _assert_same(unusual_globals, _state())
    gen = torch.Generator()
    gen.set_state(unusual_globals["rng"])
    assert torch.equal(torch.rand(4, dtype=torch.float64), torch.rand(4, generator=gen, dtype=torch.float64))


class _LeakyHandle:
    """Wraps a reference handle and vandalises process state on every call, then fails."""

    def __init__(self, inner: LayerHandle):
        self.inner = inner

    def __getattr__(self, name: str):
        attr = getattr(self.inner, name)

        def call(*args, **kwargs):
            torch.set_default_dtype(torch.float16)
            torch.set_grad_enabled(True)
            torch.set_num_threads(2)
            torch.backends.mkldnn.enabled = False
            torch.rand(100)
            out = attr(*args, **kwargs)
            if name == "merge":
                raise RuntimeError("leaky target crashed mid-merge")
            return out

        return call


class _LeakyTarget(ReferenceTarget):
    def __init__(self) -> None:
        super().__init__()
        self.name = "leaky"

    def build(self, spec: LayerSpec) -> LayerHandle:
        torch.manual_seed(99)
        return _LeakyHandle(super().build(spec))


def test_misbehaving_target_cannot_leak(unusual_globals: dict[str, object]) -> None:
    """Even a target that changes every global and then crashes leaves the caller's state intact;
    the crash is reported as an error, not a failure."""
    result = _run(_LeakyTarget(), "merge_equivalence", "linear", "float32", n=3)
    assert result.status == "error"
    assert "leaky target crashed" in (result.message or "")
    _assert_same(unusual_globals, _state())


def test_isolated_restores_on_exception(unusual_globals: dict[str, object]) -> None:
    with pytest.raises(ZeroDivisionError), isolated():
        torch.set_default_dtype(torch.float32)
        torch.manual_seed(1)
        torch.set_grad_enabled(True)
        torch.set_num_threads(1)
        torch.backends.mkldnn.enabled = False
        1 / 0  # noqa: B018
    _assert_same(unusual_globals, _state())


def test_pinned_backend_pins_inside_and_restores(unusual_globals: dict[str, object]) -> None:
    """Inside: one thread and oneDNN off (the recorded cell environment); outside: the caller's."""
    with pinned_backend(threads=1, mkldnn=False):
        assert torch.get_num_threads() == 1
        assert torch.backends.mkldnn.enabled is False
    _assert_same(unusual_globals, _state())
    with pinned_backend(threads=None, mkldnn=True):
        assert torch.get_num_threads() == unusual_globals["threads"]
        assert torch.backends.mkldnn.enabled is True
    _assert_same(unusual_globals, _state())


def test_pinned_backend_pins_and_restores_cuda_precision_switches() -> None:
    """The CUDA TF32 / reduced-precision switches are set for the cell and put back afterwards
    (the attributes exist on CPU builds too, so this runs everywhere)."""
    from properties.isolation import cuda_flag_values, pinned_backend

    matmul = torch.backends.cuda.matmul
    before = (
        matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        matmul.allow_fp16_reduced_precision_reduction,
    )
    flags = cuda_flag_values(tf32=not before[0], reduced_precision_reduction=not before[2])
    with pinned_backend(1, False, flags):
        assert matmul.allow_tf32 is (not before[0])
        assert torch.backends.cudnn.allow_tf32 is (not before[0])
        assert matmul.allow_fp16_reduced_precision_reduction is (not before[2])
    assert (
        matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        matmul.allow_fp16_reduced_precision_reduction,
    ) == before
