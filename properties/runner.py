"""Runs one cell — property x layer kind x dtype — against one target with Hypothesis.

The cell is the unit of work, of parallelism and of reporting. A run of a cell ends in one status:
``passed``, ``failed`` (a LoRA claim does not hold: the shrunk example, the seed and a replay
command come with it), ``error`` (the target crashed or hung), ``skipped`` (the target lacks a
capability the property needs; the reason is given) or ``xfailed`` (decided by the caller).
"""

from __future__ import annotations

import math
import shlex
import signal
import threading
import time
import traceback
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, reject, settings
from hypothesis import seed as hyp_seed
from hypothesis import strategies as st
from hypothesis import target as hyp_target
from hypothesis.errors import Flaky, Unsatisfiable

from properties.activity import ACTIVITY, Snapshot, TracedTarget
from properties.bias import Z_THRESHOLD, BiasPool
from properties.catalogue import Context, OutOfRange, Property, PropertyFailure
from properties.hypothesis_pins import fixed_constants, shrink_budget, without_database_key
from properties.isolation import cuda_flag_values, isolated, pinned_backend
from properties.known_bugs import compile_condition, features
from properties.precision import Arithmetic
from properties.profiles import Profile
from properties.results import CellResult, Sample
from properties.spec import DTYPES
from properties.strategies import examples, plant
from properties.targets.protocol import Target, Unsupported
from properties.xfails import XfailRule


@dataclass(frozen=True)
class Cell:
    property: str
    layer: str
    dtype: str

    def __str__(self) -> str:
        return f"{self.property} {self.layer} {self.dtype}"


@dataclass(frozen=True)
class RunOptions:
    """Everything that decides which examples a cell draws (and so what a replay needs)."""

    target: str
    profile: Profile
    seed: int
    max_examples: int | None = None
    device: str = "cpu"
    tf32: bool = False
    reduced_precision_reduction: bool = False
    threads: int | None = 1
    mkldnn: bool = False
    known_bugs: tuple[XfailRule, ...] = ()  # xfails ``when`` lines: examples set aside
    expected_cells: tuple[XfailRule, ...] = ()  # whole-cell xfails lines: a failure is not shrunk
    xfails: str = "auto"  # the --xfails given (a replay must set the same examples aside)

    @property
    def cuda_flags(self) -> dict[str, bool] | None:
        if not self.device.startswith("cuda"):
            return None
        return cuda_flag_values(self.tf32, self.reduced_precision_reduction)

    def examples(self, prop: Property | None = None) -> int:
        """``--max-examples`` as given, else the profile's count scaled by the property's cost."""
        return self.max_examples or self.profile.examples_for(prop.cost if prop else 1.0)


class CellTimeout(BaseException):
    """Raised by the alarm: a BaseException so Hypothesis does not treat it as a failing example."""


class KnownOnly(BaseException):
    """Raised when a cell's first ``Profile.known_only_limit`` examples all matched known bugs (a
    BaseException, so Hypothesis does not treat it as a failing example)."""


class TargetCrash(Exception):
    """The target raised something other than a property failure or :class:`Unsupported`."""


def cell_seed(seed: int, cell: Cell) -> int:
    return zlib.crc32(f"{seed}:{cell}".encode())


def replay_command(opts: RunOptions, cell: Cell) -> str:
    args = [
        "lora-conformance",
        "run",
        "--target",
        opts.target,
        "--profile",
        opts.profile.name,
        "--properties",
        cell.property,
        "--layers",
        cell.layer,
        "--dtypes",
        cell.dtype,
        "--seed",
        str(opts.seed),
    ]
    if opts.max_examples:
        args += ["--max-examples", str(opts.max_examples)]
    if opts.device != "cpu":
        args += ["--device", opts.device]
    if opts.xfails != "auto":
        args += ["--xfails", opts.xfails]
    return shlex.join(args)


def _crash_summary(e: BaseException) -> str:
    """One line: the exception and where in the target it came from (innermost frame)."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}{where}"


@dataclass
class _CellState:
    """What the Hypothesis loop saw, kept outside it (Hypothesis reruns the shrunk example last)."""

    samples: list[Sample] = field(default_factory=list)
    unsupported: Counter = field(default_factory=Counter)
    known: Counter = field(default_factory=Counter)  # xfails 'when' line -> examples set aside
    out_of_range: Counter = field(default_factory=Counter)  # reason -> examples outside the claim
    bias: dict[str, BiasPool] = field(default_factory=dict)  # quantity -> the cell's examples' blocks
    bias_seen: set[str] = field(default_factory=set)  # examples already counted (replays add nothing)
    examples: int = 0
    last_failure: tuple[str, str, str] | None = None  # (kind, message, example)
    worst: tuple[float, str] = (-1.0, "")


class ExampleTimeout(BaseException):
    """Raised by the alarm when one example runs past its limit; says where it was interrupted."""

    def __init__(self, frame: str, activity: Snapshot):
        super().__init__(frame)
        self.frame = frame
        self.activity = activity  # taken when the alarm fired, before the call's ``finally`` ran


class _Watchdog:
    """Wall-clock limits via SIGALRM: one for the cell, one for each example (main thread only;
    elsewhere no limit is enforced here, and a worker's parent still enforces both).

    One timer serves both: it is armed for whichever deadline comes first. The per-example limit is
    what finds a hang fast: the first example that hangs ends the cell, instead of every example
    waiting out the cell's limit. Native code that never returns to the interpreter ignores the
    alarm; the parent of a worker kills it (see :mod:`properties.workers`).
    """

    def __init__(self, cell_s: float, example_s: float):
        self.cell_s, self.example_s = cell_s, example_s
        self.armed = (cell_s > 0 or example_s > 0) and threading.current_thread() is threading.main_thread()
        self.cell_deadline = self.example_deadline = math.inf

    def _fire(self, _signum, frame):
        now = time.monotonic()
        if now >= self.example_deadline - 1e-3:
            where = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}" if frame else ""
            raise ExampleTimeout(where, ACTIVITY.snapshot())
        if now >= self.cell_deadline - 1e-3:
            raise CellTimeout()
        self._arm()  # early by the two clocks' drift: wait for the deadline itself

    def _arm(self) -> None:
        left = min(self.cell_deadline, self.example_deadline) - time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3) if math.isfinite(left) else 0)

    def start_example(self) -> None:
        if self.armed and self.example_s > 0:
            self.example_deadline = time.monotonic() + self.example_s
            self._arm()

    def end_example(self) -> None:
        if self.armed and self.example_s > 0:
            self.example_deadline = math.inf
            self._arm()

    def cell_expired(self) -> bool:
        """The cell's deadline has passed (checked after the cell ended, whatever it ended with)."""
        return self.armed and time.monotonic() >= self.cell_deadline - 1e-3

    def __enter__(self):
        if self.armed:
            self.old = signal.signal(signal.SIGALRM, self._fire)
            if self.cell_s > 0:
                self.cell_deadline = time.monotonic() + self.cell_s
            self._arm()
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)


def _out_of_time(e: BaseException, watchdog: _Watchdog) -> bool:
    """A Flaky error that ends a cell after its deadline is the cell running out of time, not a property
    failure: the CellTimeout fired inside Hypothesis' own bookkeeping, which reported it as "Inconsistent
    data generation" (seen on a loaded machine: the ci gate of PEFT 0.14.0, docs/peft-releases.md)."""
    return isinstance(e, Flaky) and watchdog.cell_expired()


def _seed_rngs(seed: int, device: str) -> None:
    """Seed the generators a target's dropout draws from, so a replayed example redraws its masks.

    ``torch.manual_seed`` also queues seeding for every lazily initialised backend (CUDA, XPU,
    MTIA), formatting a stack trace for each: 4 ms per example, more than most examples cost.
    """
    torch.default_generator.manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.manual_seed_all(seed)


def phases_for(cell: Cell, opts: RunOptions) -> tuple[Phase, ...]:
    """Hypothesis phases for a cell. A cell listed as a whole-cell expected failure only has to show
    that it still fails: shrinking it (up to the profile's shrink budget) would be most of a library's
    gate time, so it is not shrunk."""
    if any(r.matches(cell.property, cell.layer, cell.dtype) for r in opts.expected_cells):
        return (Phase.generate, Phase.target)
    return (Phase.generate, Phase.target, Phase.shrink)


def skip_reason(target: Target, prop: Property, cell: Cell) -> str | None:
    """Why this target cannot run this cell at all, or None."""
    caps = target.capabilities()
    if cell.layer not in prop.layers:
        return f"{prop.id} does not apply to {cell.layer}"
    if cell.layer not in caps.layers:
        return caps.notes.get(cell.layer, f"{target.name} has no {cell.layer} layer")
    if DTYPES[cell.dtype] not in caps.dtypes:
        return caps.notes.get(cell.dtype, f"{target.name} does not support {cell.dtype}")
    missing = prop.missing(caps)
    if missing:
        reasons = [caps.notes.get(m, f"no {m}") for m in missing]
        return f"{target.name} lacks {', '.join(missing)} ({'; '.join(reasons)})"
    return None


def _cell_hang(opts: RunOptions, state: _CellState) -> str:
    return f"hang: the cell ran past {opts.profile.cell_timeout_s:g} s ({state.examples} examples done)"


def run_cell(target: Target, prop: Property, cell: Cell, opts: RunOptions) -> CellResult:
    """Run one cell to a :class:`CellResult`. Never raises for target misbehaviour."""
    started = time.perf_counter()
    result = CellResult(cell.property, cell.layer, cell.dtype, "passed", seed=opts.seed)
    if prop.bind is not None:  # a model property talks to the target's model half
        try:
            target = prop.bind(target)
        except Unsupported as e:
            result.status, result.message = "skipped", str(e)
            return result
    reason = skip_reason(target, prop, cell)
    if reason:
        result.status, result.message = "skipped", reason
        return result
    dtype = DTYPES[cell.dtype]
    caps = target.capabilities()
    draw = replace(prop.draw(caps, cell.layer, dtype), device=opts.device)
    arith = Arithmetic.for_dtype(
        dtype,
        tf32=opts.tf32 and opts.device != "cpu",
        reduced_precision_reduction=opts.reduced_precision_reduction,
    )
    state = _CellState()
    known = [
        (r, compile_condition(r.condition))
        for r in opts.known_bugs
        if r.matches(cell.property, cell.layer, cell.dtype)
    ]
    drawn_examples = prop.examples(draw) if prop.examples else examples(draw, hostile=prop.hostile)
    strategy = st.tuples(drawn_examples, st.data() if prop.needs_data else st.none())
    traced = TracedTarget(target)  # records each target call, so a hang or crash can name it
    watchdog = _Watchdog(opts.profile.cell_timeout_s, opts.profile.example_timeout_s)
    ACTIVITY.reset()

    def one_example(drawn) -> None:
        ex, data = drawn
        hostile = None
        clean_spec = None
        if prop.hostile:
            clean, hostile = ex
            clean_spec, ex = clean.spec, plant(clean, hostile)
        if known:
            facts = features(ex, hostile)
            for rule, applies in known:
                if applies(facts):
                    state.known[str(rule)] += 1
                    limit = opts.profile.known_only_limit
                    if limit and not state.examples and sum(state.known.values()) >= limit:
                        raise KnownOnly()
                    reject()  # a known bug: set aside, so the rest of the cell is still tested
        state.examples += 1
        ctx = Context(traced, ex, arith, data=data, hostile=hostile, clean_spec=clean_spec)
        description = ex.describe() + (f"\nhostile: {hostile}" if hostile else "")
        ACTIVITY.start_example(state.examples, description)
        watchdog.start_example()
        try:
            with isolated(), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _seed_rngs(ex.spec.seed, opts.device)
                prop.check(ctx)
        except Unsupported as e:
            state.unsupported[str(e)] += 1
            reject()
        except OutOfRange as e:  # outside the claim: its comparisons are dropped, the example counted
            state.examples -= 1
            state.out_of_range[str(e)] += 1
            ctx.samples.clear()
            ctx.bias.clear()
            reject()
        except PropertyFailure as e:
            state.last_failure = ("failed", str(e), description)
            raise
        except Exception as e:  # noqa: BLE001 - a crashing target is a result, not our crash
            state.last_failure = ("error", _crash_summary(e), description)
            raise TargetCrash(state.last_failure[1]) from e
        finally:
            watchdog.end_example()
            ACTIVITY.end_example()
            state.samples.extend(ctx.samples)
            _add_bias(state, ctx, description)
        worst = max((s.ratio for s in ctx.samples), default=0.0)
        if worst > state.worst[0]:
            state.worst = (worst, description)
        if opts.profile.target_ratio and ctx.samples:
            hyp_target(math.log(max(worst, 1e-300)), label="log error ratio")

    test = settings(
        max_examples=opts.examples(prop),
        derandomize=False,
        database=None,
        deadline=None,
        print_blob=False,
        report_multiple_bugs=False,
        verbosity=Verbosity.quiet,
        phases=phases_for(cell, opts),
        suppress_health_check=list(HealthCheck),
    )(hyp_seed(cell_seed(opts.seed, cell))(without_database_key(given(strategy)(one_example))))

    try:
        with (
            watchdog,
            pinned_backend(opts.threads, opts.mkldnn, opts.cuda_flags),
            shrink_budget(opts.profile.shrink_seconds),
            fixed_constants(),
        ):
            test()
    except CellTimeout:
        result.status = "error"
        result.message = _cell_hang(opts, state)
    except ExampleTimeout as e:
        result.status = "error"
        result.message = hang_message(e.activity, opts.profile.example_timeout_s, e.frame)
        result.example = e.activity.description
        result.replay = replay_command(opts, cell)
    except KnownOnly:
        result.status = "xfailed"
        result.message = (
            "every example drawn matched a known bug: "
            + _known_summary(state.known, opts)
            + f" (the {opts.profile.name} profile stops after {opts.profile.known_only_limit} such examples)"
        )
    except Unsatisfiable:
        if state.known and not state.examples:
            result.status = "xfailed"
            result.message = "every example drawn matched a known bug: " + _known_summary(state.known, opts)
        elif state.out_of_range and not state.examples:
            result.status = "skipped"
            result.message = "every example drawn lies outside the claim: " + "; ".join(state.out_of_range)
        else:
            result.status = "skipped"
            result.message = "; ".join(state.unsupported) or "no valid example could be generated"
    except (PropertyFailure, TargetCrash, Flaky, Exception) as e:  # noqa: BLE001
        kind, message, example = state.last_failure or ("error", _crash_summary(e), "")
        if _out_of_time(e, watchdog):
            kind, message, example = "error", _cell_hang(opts, state), ""
        elif isinstance(e, Flaky):
            kind, message = "failed", f"flaky (did not reproduce on replay): {message}"
        result.status = kind
        result.message = message
        result.example = example
        result.replay = replay_command(opts, cell)
    result.examples = state.examples
    result.duration_s = time.perf_counter() - started
    if state.unsupported and result.status == "passed":
        result.message = f"{sum(state.unsupported.values())} examples unsupported: " + "; ".join(
            state.unsupported
        )
    _bias_verdict(result, state, opts, cell)
    if state.out_of_range:
        result.out_of_range_examples = dict(state.out_of_range)
        if result.status == "passed":
            aside = f"{sum(state.out_of_range.values())} examples outside the claim: " + "; ".join(
                f"{k} ({n})" for k, n in state.out_of_range.items()
            )
            result.message = aside + (f"; {result.message}" if result.message else "")
    if state.known:
        result.known_bug_examples = dict(state.known)
        if result.status == "passed":
            aside = f"{sum(state.known.values())} examples set aside as known bugs: "
            result.message = (
                aside + _known_summary(state.known, opts) + (f"; {result.message}" if result.message else "")
            )
    _keep_samples(result, state, opts.profile.samples_kept)
    return result


def hang_message(activity: Snapshot, limit_s: float, frame: str = "", killed: bool = False) -> str:
    """One line naming the example and the target call that hung (and the frame, when known)."""
    at = f" at {frame}" if frame else ""
    how = " and ignored the alarm (native code?), so its worker was killed" if killed else ""
    return (
        f"hang: {activity.where()}{at}, ran past the {limit_s:g} s example limit (--example-timeout)"
        f"{how}; the rest of the cell was not run"
    )


def _add_bias(state: _CellState, ctx: Context, key: str) -> None:
    """Add an example's bias blocks to the cell's pool, once per distinct example (a replayed example
    is not independent of itself), grouped by the seed its tensors came from (``BiasPool``)."""
    if not ctx.bias or key in state.bias_seen:
        return
    state.bias_seen.add(key)
    for t in ctx.bias:
        state.bias.setdefault(t.quantity, BiasPool(t.quantity)).add(t, ctx.spec.seed)


def _bias_verdict(result: CellResult, state: _CellState, opts: RunOptions, cell: Cell) -> None:
    """The bias test over the cell's examples together (``properties.bias``): it fails a cell that
    passed example by example when the examples' small leans add up past the threshold."""
    if not state.bias:
        return
    pooled = {q: pool.tally() for q, pool in state.bias.items()}
    result.bias = {q: t.summary() for q, t in pooled.items()}
    worst = max(pooled.values(), key=lambda t: abs(t.verdict()[1]))
    name, z, eps = worst.verdict()
    result.max_bias_z = abs(z)
    if result.status == "passed" and abs(z) > Z_THRESHOLD:
        result.status = "failed"
        result.message = (
            f"{worst.quantity}: systematic error along the LoRA delta over the cell's "
            f"{worst.comparisons} comparisons, below the element-wise bound: relative scaling error "
            f"~ {eps:.3g}, z = {z:.3g} beyond {Z_THRESHOLD:.3g} against every correct rounding sequence "
            f"(closest: {name}); false-alarm rate <= 1e-6"
        )
        together = f"the cell's {worst.comparisons} comparisons together; the example with the worst ratio:"
        result.example = f"{together}\n{state.worst[1]}"
        result.replay = replay_command(opts, cell)


def _known_summary(known: Counter, opts: RunOptions) -> str:
    reasons = {str(r): r.reason for r in opts.known_bugs}
    return "; ".join(f"{reasons.get(k, k)} ({n})" for k, n in known.items())


def _keep_samples(result: CellResult, state: _CellState, keep: int) -> None:
    """Statistics over every sample; a spread-out subset (always with the worst) kept for plots."""
    result.samples = state.samples
    result.summarize()
    if state.worst[0] >= 0:
        result.worst_example = state.worst[1]
    if len(state.samples) > keep:
        step = len(state.samples) / keep
        kept = [state.samples[int(i * step)] for i in range(keep)]
        worst = max(state.samples, key=lambda s: s.ratio if math.isfinite(s.ratio) else math.inf)
        if worst not in kept:
            kept[-1] = worst
        result.samples = kept
