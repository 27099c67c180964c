"""Cells run in worker processes, so a target that kills its process costs a worker, not the run.

A segfault in a native kernel, an ``os._exit`` in a dependency or the out-of-memory killer ends the
worker; the parent turns that into an ``error`` cell naming the signal or exit status and the example
and target call that were running (read from the worker's :class:`~properties.activity.Beacon`), and
the run goes on with a fresh worker. The parent also enforces the time limits the worker's own alarm
enforces, a little later: a hang in native code that never returns to the interpreter ignores the
alarm, so the parent kills the worker.

A worker is started once (importing torch and the target costs a second or two) and reused for every
cell until it dies. It loads the target as soon as it starts, while the parent is still setting up.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection, wait
from typing import Any

from properties.activity import ACTIVITY, Beacon
from properties.results import CellResult
from properties.runner import Cell, RunOptions, hang_message, replay_command

# The worker's own alarm fires first; the parent kills after this much more (plus 10% of the limit),
# so a Python-level hang is reported with its frame and the worker is kept.
KILL_GRACE_S = 5.0
# A worker that has not started its cell this long after it was handed one is stuck starting up.
START_LIMIT_S = 600.0
POLL_S = 0.25

_SIGNAL_MEANING = {  # by name: not every platform has every signal
    "SIGSEGV": "segmentation fault: a crash in native code",
    "SIGBUS": "bus error: a crash in native code",
    "SIGILL": "illegal instruction: a native kernel built for another CPU?",
    "SIGFPE": "floating-point exception in native code",
    "SIGABRT": "aborted: a native assertion or fatal error",
    "SIGKILL": "killed: out of memory, or killed from outside",
    "SIGTERM": "terminated from outside",
}


def death_cause(exitcode: int | None) -> str:
    """The worker's end in words: the signal and what it usually means, or the exit status."""
    if exitcode is None:
        return "the worker process stopped answering"
    if exitcode < 0:
        try:
            sig = signal.Signals(-exitcode)
        except ValueError:
            return f"the worker process died of signal {-exitcode}"
        meaning = _SIGNAL_MEANING.get(sig.name)
        return f"the worker process died of {sig.name}" + (f" ({meaning})" if meaning else "")
    return (
        f"the worker process exited with status {exitcode} (os._exit or sys.exit in the target or a "
        "library it calls)"
    )


def _worker_main(conn: Connection, beacon: Beacon, target_name: str) -> None:
    """A worker's life: load the target, then run each cell it is handed until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent()
    from properties.catalogue import all_properties
    from properties.runner import run_cell
    from properties.targets.registry import load_target

    ACTIVITY.mirror = beacon
    try:
        target, load_error = load_target(target_name), None
    except Exception as e:  # noqa: BLE001 - reported per cell below
        target, load_error = None, f"the worker could not load target {target_name!r}: {e}"
    catalogue = all_properties()
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        cell, opts = job
        beacon.start_cell()
        if target is None:
            result = CellResult(cell.property, cell.layer, cell.dtype, "error", message=load_error)
        else:
            try:
                result = run_cell(target, catalogue[cell.property], cell, opts)
            except BaseException as e:  # noqa: BLE001 - sys.exit in a target: an error cell, not a dead worker
                message = f"{type(e).__name__}: {e} escaped the cell, during {ACTIVITY.snapshot().where()}"
                result = CellResult(cell.property, cell.layer, cell.dtype, "error", message=message)
        beacon.end_cell()
        conn.send(result)


def _die_with_parent() -> None:
    """Exit when the run's main process dies, even by SIGKILL (Linux).

    Without it, workers of a killed run linger, holding memory (and a library's files open).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the prctl
        os._exit(0)


def start_method(device: str = "cpu") -> str:
    """``fork`` where it is safe, else ``spawn``.

    A forked worker starts in milliseconds with torch and the target already imported; a spawned one
    imports them again (1-3 s of CPU a worker, and again after every crash). Forking is safe on Linux
    from a single-threaded process that has not initialised CUDA (a forked child cannot use CUDA, and a
    lock held by another thread would stay held in the child), which is the command line's case;
    pytest-xdist workers and CUDA runs spawn.
    """
    import threading

    import torch

    single = threading.active_count() == 1
    if sys.platform.startswith("linux") and single and device == "cpu" and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


class _Worker:
    """One worker process, its pipe, its beacon and the cell it is running (if any)."""

    def __init__(self, ctx: Any, target_name: str) -> None:
        self.beacon = Beacon(ctx)
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(child, self.beacon, target_name), daemon=True, name="lora-worker"
        )
        self.process.start()
        child.close()
        self.cell: Cell | None = None
        self.handed = 0.0  # monotonic time the current cell was handed over

    def hand(self, cell: Cell, opts: RunOptions) -> None:
        self.beacon.start_cell(started=0.0)  # the worker stamps the start when it takes the cell
        self.conn.send((cell, opts))
        self.cell, self.handed = cell, time.monotonic()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)

    def stop(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(None)
        self.process.join(5)
        if self.process.is_alive():
            self.kill()
        self.conn.close()


class WorkerPool:
    """``jobs`` worker processes for one target; dead workers are replaced on the next cell.

    Used as a context manager, so workers never outlive the run (or the pytest session)."""

    def __init__(
        self, target_name: str, jobs: int = 1, *, device: str = "cpu", method: str | None = None
    ) -> None:
        self.target_name = target_name
        self.jobs = max(1, jobs)
        self._ctx = multiprocessing.get_context(method or start_method(device))
        self._workers: list[_Worker] = []

    def __enter__(self) -> WorkerPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the workers now, so they import torch and load the target while the caller sets up."""
        while len(self._workers) < self.jobs:
            self._workers.append(_Worker(self._ctx, self.target_name))

    def run(self, cells: Iterable[Cell], opts: RunOptions, done: Callable[[CellResult], None]) -> None:
        """Run every cell, handing each result to ``done`` as it comes; returns when all are done."""
        pending = deque(cells)
        busy: list[_Worker] = []
        try:
            while pending or busy:
                while pending and len(busy) < self.jobs:
                    worker = self._idle_worker(busy)
                    worker.hand(pending.popleft(), opts)
                    busy.append(worker)
                ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=POLL_S)
                for worker in list(busy):
                    result = self._collect(worker, ready, opts)
                    if result is not None:
                        busy.remove(worker)
                        worker.cell = None
                        done(result)
        except BaseException:
            for worker in busy:  # a cell half-run in a worker is abandoned with it (Ctrl-C)
                worker.kill()
                self._workers.remove(worker)
            raise

    def run_one(self, cell: Cell, opts: RunOptions) -> CellResult:
        results: list[CellResult] = []
        self.run([cell], opts, results.append)
        return results[0]

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers.clear()

    def _idle_worker(self, busy: list[_Worker]) -> _Worker:
        for worker in self._workers:
            if worker not in busy and worker.process.is_alive():
                return worker
        for worker in [w for w in self._workers if w not in busy]:  # dead ones: replaced
            self._workers.remove(worker)
            worker.kill()
            worker.conn.close()
        worker = _Worker(self._ctx, self.target_name)
        self._workers.append(worker)
        return worker

    def _collect(self, worker: _Worker, ready: list[Any], opts: RunOptions) -> CellResult | None:
        """The worker's result, an error result if it died or hung, or None while it is still working."""
        if worker.conn in ready:
            try:
                return worker.conn.recv()
            except (EOFError, OSError):
                pass  # it died; its exit status tells how
        elif worker.process.sentinel not in ready:
            hang = self._overdue(worker, opts)
            if hang is None:
                return None
            worker.kill()
            return self._error(worker, opts, hang)
        worker.process.join(5)
        activity = worker.beacon.snapshot()
        cause = death_cause(worker.process.exitcode)
        return self._error(worker, opts, f"crash: {cause}, during {activity.where()}; the run went on")

    def _overdue(self, worker: _Worker, opts: RunOptions) -> str | None:
        """A message when the worker's cell or example is past its limit by more than the grace."""
        now = time.monotonic()
        profile = opts.profile
        activity = worker.beacon.snapshot()
        example_limit = profile.example_timeout_s
        overdue = now - activity.example_started > example_limit * 1.1 + KILL_GRACE_S
        if activity.in_example and example_limit > 0 and overdue:
            return hang_message(activity, example_limit, killed=True)
        started = worker.beacon.cell_started
        cell_limit = profile.cell_timeout_s
        if started and cell_limit > 0 and now - started > cell_limit * 1.1 + KILL_GRACE_S:
            return (
                f"hang: the cell ran past {cell_limit:g} s and ignored the alarm (native code?), during "
                f"{activity.where()}; its worker was killed"
            )
        if not started and now - worker.handed > START_LIMIT_S:
            return f"the worker did not start the cell within {START_LIMIT_S:g} s (stuck loading the target?)"
        return None

    def _error(self, worker: _Worker, opts: RunOptions, message: str) -> CellResult:
        cell = worker.cell
        assert cell is not None
        activity = worker.beacon.snapshot()
        return CellResult(
            cell.property,
            cell.layer,
            cell.dtype,
            "error",
            examples=activity.example,
            duration_s=time.monotonic() - worker.handed,
            message=message,
            example=activity.description or None,
            replay=replay_command(opts, cell),
            seed=opts.seed,
        )
