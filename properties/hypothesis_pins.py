"""Pins on Hypothesis's engine that make a cell's examples a function of its seed alone.

Hypothesis has no public settings for these; each pin patches one private name for the duration of a
cell and restores it, and does nothing on a Hypothesis release that lacks the name.

- **Local constants.** Since 6.131 Hypothesis sometimes draws literals harvested from the source of
  "local" modules in ``sys.modules`` (with a 100 ms parsing budget). Which modules a worker has
  imported depends on which cells it ran before, and the budget on the machine's load, so the same
  seed drew different examples in different runs. The pin offers no local constants; Hypothesis's
  own global constants (0, ±1, NaN, ...) stay.
- **Shrink budget.** The engine shrinks a failure for up to 300 s; a CI cell should fail fast.
- **No database key.** With no example database Hypothesis still hashes the test's source for a
  database key (``inspect.getsource`` plus tokenizing: ~5 ms, paid once per cell, 444 times in ci).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from hypothesis.internal.conjecture import engine as hyp_engine

try:
    from hypothesis.internal.conjecture import providers as hyp_providers
except ImportError:  # pragma: no cover - very old Hypothesis
    hyp_providers = None


@contextlib.contextmanager
def _patched(obj: object, name: str, value: object) -> Iterator[None]:
    if obj is None or not hasattr(obj, name):
        yield
        return
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _no_local_constants():
    """An empty constants pool of the type the installed Hypothesis expects."""
    empty = hyp_providers._local_constants
    return type(empty)(
        **{f: type(getattr(empty, f))() for f in ("integers", "bytes", "strings")},
        floats=type(empty.floats)(key=hyp_providers.float_to_int),
    )


@contextlib.contextmanager
def fixed_constants() -> Iterator[None]:
    """Generation that does not depend on imported modules or on time (see module docstring)."""
    if hyp_providers is None or not hasattr(hyp_providers, "_get_local_constants"):
        yield
        return
    global _PINNED
    if _PINNED is None:
        # Our own cache of allowed constants per draw kind, kept across cells: it only ever holds
        # Hypothesis's global constants, never local ones filled by other tests in this process.
        _PINNED = (_no_local_constants(), type(hyp_providers.CONSTANTS_CACHE)(1024))
    empty, cache = _PINNED
    with (
        _patched(hyp_providers, "_get_local_constants", lambda *_: empty),
        _patched(hyp_providers, "CONSTANTS_CACHE", cache),
    ):
        yield


_PINNED: tuple[object, object] | None = None


@contextlib.contextmanager
def shrink_budget(seconds: float) -> Iterator[None]:
    """Bound the time Hypothesis spends shrinking one failure."""
    with _patched(hyp_engine, "MAX_SHRINKING_SECONDS", seconds):
        yield


def without_database_key(test: Callable[..., object]) -> Callable[..., object]:
    """Mark a ``@given`` test as having no database key (the suite runs with ``database=None``)."""
    test._hypothesis_internal_database_key = None  # type: ignore[attr-defined]
    return test
