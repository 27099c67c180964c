"""Leave no trace: a property run must not change the process it runs in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Restore torch's default dtype, RNG state (CPU and CUDA), grad mode, thread count and the
    oneDNN switch."""
    dtype = torch.get_default_dtype()
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    grad = torch.is_grad_enabled()
    threads = torch.get_num_threads()
    mkldnn = torch.backends.mkldnn.enabled
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        torch.set_grad_enabled(grad)
        torch.backends.mkldnn.enabled = mkldnn
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


_CUDA_FLAGS = (
    ("cuda_matmul_allow_tf32", torch.backends.cuda.matmul, "allow_tf32"),
    ("cudnn_allow_tf32", torch.backends.cudnn, "allow_tf32"),
    (
        "allow_fp16_reduced_precision_reduction",
        torch.backends.cuda.matmul,
        "allow_fp16_reduced_precision_reduction",
    ),
    (
        "allow_bf16_reduced_precision_reduction",
        torch.backends.cuda.matmul,
        "allow_bf16_reduced_precision_reduction",
    ),
)


def cuda_flag_values(tf32: bool, reduced_precision_reduction: bool) -> dict[str, bool]:
    """The CUDA precision switches a run pins, by name (only those this torch has)."""
    want = {
        "cuda_matmul_allow_tf32": tf32,
        "cudnn_allow_tf32": tf32,
        "allow_fp16_reduced_precision_reduction": reduced_precision_reduction,
        "allow_bf16_reduced_precision_reduction": reduced_precision_reduction,
    }
    return {name: want[name] for name, obj, attr in _CUDA_FLAGS if hasattr(obj, attr)}


@contextlib.contextmanager
def pinned_backend(
    threads: int | None = 1, mkldnn: bool = False, cuda_flags: dict[str, bool] | None = None
) -> Iterator[None]:
    """The arithmetic environment a cell runs in, restored afterwards.

    One thread per cell: cells run in parallel processes, and tiny products on two threads spend
    their time synchronising. oneDNN off by default on CPU: it builds a new primitive for every new
    conv shape (~0.5 ms for a 5x5 float32 conv against ~25 us natively); both are correct
    implementations, and the choice is recorded in the report header. On CUDA the TF32 and
    reduced-precision-reduction switches are pinned to what the precision model was told.
    """
    saved = [(obj, attr, getattr(obj, attr)) for _, obj, attr in _CUDA_FLAGS if hasattr(obj, attr)]
    with isolated():
        if threads:
            torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = mkldnn
        for name, obj, attr in _CUDA_FLAGS:
            if cuda_flags and name in cuda_flags:
                setattr(obj, attr, cuda_flags[name])
        try:
            yield
        finally:
            for obj, attr, value in saved:
                setattr(obj, attr, value)
