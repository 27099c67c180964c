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


@contextlib.contextmanager
def pinned_backend(threads: int | None = 1, mkldnn: bool = False) -> Iterator[None]:
    """The arithmetic environment a cell runs in, restored afterwards.

    One thread per cell: cells run in parallel processes, and tiny products on two threads spend
    their time synchronising. oneDNN off by default on CPU: it builds a new primitive for every new
    conv shape (~0.5 ms for a 5x5 float32 conv against ~25 us natively); both are correct
    implementations, and the choice is recorded in the report header.
    """
    with isolated():
        if threads:
            torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = mkldnn
        yield
