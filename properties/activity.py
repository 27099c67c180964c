"""What a cell is doing right now: which example, and which call into the target.

A hang or a dead worker is only useful to a user when it names the example and the target call that
was running ("example 3, in handle.merge"). The runner records the example before running it, and
the target it hands to properties is wrapped so that every call to ``build`` and to a handle method
is recorded. In a worker process the record is mirrored into memory shared with the parent
(:class:`Beacon`), so the parent can still read it after the worker was killed or died.

Recording is a few attribute writes per call (plus a copy into shared memory in a worker): nothing a
target's own work would notice.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from typing import Any

_OPERATION_BYTES = 96
_DESCRIPTION_BYTES = 8192


@dataclass(frozen=True)
class Snapshot:
    """The activity at one moment, as plain values."""

    example: int  # 1-based number of the example within the cell; 0 before the first
    description: str  # the example, human-readable ("" before the first)
    operation: str  # the target call running, or the suite's work after the last one
    in_example: bool
    example_started: float  # time.monotonic() when the example began (0 when none runs)
    operation_started: float

    def where(self) -> str:
        """'example 3, in handle.forward' (or a plainer phrase outside an example)."""
        if not self.example:
            return f"before the first example, in {self.operation or 'the suite'}"
        return f"example {self.example}, in {self.operation or 'the suite'}"


class Beacon:
    """Shared memory a worker writes its activity into and the parent reads (even after a crash).

    Created by the parent from a multiprocessing context and handed to the worker as a process
    argument. Reads are not synchronised: the parent reads the times while the worker runs (a torn
    read of one double is impossible on the platforms torch runs on) and the texts after it stopped.
    """

    def __init__(self, ctx: Any) -> None:
        # times: example number, example started, operation started, cell started, in example (0/1)
        self.times = ctx.RawArray(ctypes.c_double, 5)
        self.operation = ctx.RawArray(ctypes.c_char, _OPERATION_BYTES)
        self.description = ctx.RawArray(ctypes.c_char, _DESCRIPTION_BYTES)

    @staticmethod
    def _put(buffer: Any, text: str) -> None:
        buffer.value = text.encode("utf-8", "replace")[: len(buffer) - 1]

    def start_cell(self, started: float | None = None) -> None:
        """A clean record for a new cell; ``started`` defaults to now."""
        self.times[0:5] = [0.0, 0.0, 0.0, time.monotonic() if started is None else started, 0.0]
        self._put(self.operation, "")
        self._put(self.description, "")

    def end_cell(self) -> None:
        self.times[3] = 0.0
        self.times[4] = 0.0

    @property
    def cell_started(self) -> float:
        return self.times[3]

    def snapshot(self) -> Snapshot:
        t = list(self.times)
        return Snapshot(
            example=int(t[0]),
            description=self.description.value.decode("utf-8", "replace"),
            operation=self.operation.value.decode("utf-8", "replace"),
            in_example=bool(t[4]),
            example_started=t[1],
            operation_started=t[2],
        )


class Activity:
    """The running cell's example and target call, kept in this process (and mirrored to a Beacon)."""

    def __init__(self) -> None:
        self.mirror: Beacon | None = None
        self.reset()

    def reset(self) -> None:
        self.example = 0
        self.description = ""
        self.operation = ""
        self.in_example = False
        self.example_started = 0.0
        self.operation_started = 0.0

    def start_example(self, number: int, description: str) -> None:
        now = time.monotonic()
        self.example, self.description, self.in_example = number, description, True
        self.example_started = self.operation_started = now
        self.operation = "the suite (before the first target call)"
        if self.mirror is not None:
            Beacon._put(self.mirror.description, description)
            Beacon._put(self.mirror.operation, self.operation)
            self.mirror.times[0:3] = [float(number), now, now]
            self.mirror.times[4] = 1.0

    def end_example(self) -> None:
        self.in_example = False
        self.example_started = 0.0
        if self.mirror is not None:
            self.mirror.times[4] = 0.0
            self.mirror.times[1] = 0.0

    def enter(self, operation: str) -> None:
        self.operation = operation
        self.operation_started = time.monotonic()
        if self.mirror is not None:
            Beacon._put(self.mirror.operation, operation)
            self.mirror.times[2] = self.operation_started

    def leave(self, operation: str) -> None:
        # Code after a call is the suite's (oracle, comparison) or the target's own module returned by
        # the call (merge_and_unload); naming the last call keeps either case findable.
        self.enter(f"the suite's work after {operation}")

    def snapshot(self) -> Snapshot:
        return Snapshot(
            self.example,
            self.description,
            self.operation,
            self.in_example,
            self.example_started,
            self.operation_started,
        )


ACTIVITY = Activity()


class TracedHandle:
    """A layer handle whose method calls are recorded as ``handle.<method>`` in :data:`ACTIVITY`."""

    __slots__ = ("_inner",)

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr
        operation = f"handle.{name}"

        def call(*args: Any, **kwargs: Any) -> Any:
            ACTIVITY.enter(operation)
            try:
                return attr(*args, **kwargs)
            finally:
                ACTIVITY.leave(operation)

        return call


class TracedTarget:
    """A target whose ``build`` is recorded as ``target.build`` and returns a :class:`TracedHandle`.

    Everything else (``name``, ``capabilities()``, ...) passes through unchanged."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def build(self, spec: Any) -> TracedHandle:
        ACTIVITY.enter("target.build")
        try:
            return TracedHandle(self._inner.build(spec))
        finally:
            ACTIVITY.leave("target.build")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
