"""A run: properties x layer kinds x dtypes for one target, in worker processes (or in this one).

Results stream to a sink as each cell finishes, so an interrupted (Ctrl-C) or crashing run keeps
every finished cell; the CLI's sink rewrites ``report.json`` atomically after each one.
"""

from __future__ import annotations

import fnmatch
import platform
import sys
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import hypothesis
import torch

from properties import __version__
from properties.catalogue import Property, all_properties
from properties.results import CellResult, RunHeader, RunReport
from properties.runner import Cell, RunOptions, run_cell
from properties.spec import DTYPES, LAYER_KINDS, QUANT_KINDS
from properties.targets.protocol import Target
from properties.targets.registry import load_target
from properties.workers import WorkerPool
from properties.xfails import XfailRule, cell_rules, example_rules, match


def plan_cells(
    properties: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    dtypes: Sequence[str] | None = None,
    shard: tuple[int, int] | None = None,
) -> list[Cell]:
    """Every cell asked for, in catalogue order; ``shard=(i, n)`` keeps a deterministic 1/n of them."""
    catalogue = all_properties()
    if properties:  # globs select by pattern: --properties 'model_*' is the model half
        properties = [m for p in properties for m in (fnmatch.filter(catalogue, p) if _glob(p) else [p])]
    # Quantized kinds run only when asked for (--layers): they need a quantizer.
    kinds = all_kinds()
    default_kinds = [k for k in kinds if k not in QUANT_KINDS]
    for kind, given, known in (("property", properties, catalogue), ("layer", layers, kinds)):
        unknown = [g for g in given or () if g not in known]
        if unknown:
            raise ValueError(f"unknown {kind} {', '.join(unknown)}; known: {', '.join(known)}")
    unknown = [d for d in dtypes or () if d not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtype {', '.join(unknown)}; known: {', '.join(DTYPES)}")
    cells = [
        Cell(p, layer, d)
        for p in (properties or list(catalogue))
        for layer in (layers or default_kinds)
        for d in (dtypes or list(DTYPES))
        if layer in catalogue[p].layers
    ]
    if shard:
        i, n = shard
        # By a hash of the cell, not by position: a cell stays in its shard when others are added.
        cells = [c for c in cells if zlib.crc32(str(c).encode()) % n == i - 1]
    return cells


def all_kinds() -> list[str]:
    """Layer kinds, quantized kinds, then the kinds only some properties have (model architectures)."""
    catalogue = all_properties()
    return list(
        dict.fromkeys([*LAYER_KINDS, *QUANT_KINDS, *(k for p in catalogue.values() for k in p.layers)])
    )


def _stale(rules: list[XfailRule], used: set[str], scope: Sequence[Cell]) -> list[str]:
    """The xfails lines to report as matching nothing: unused, and either matching a cell in scope or
    no cell at all (a typo, a removed property). A line whose cells all lie outside this run's scope
    (a quantized line in a run without quantized kinds) is not stale, only not exercised."""
    unused = [r for r in rules if r.key not in used]
    if not unused:
        return []
    universe = plan_cells(layers=all_kinds())

    def reachable(r: XfailRule, cells: Sequence[Cell]) -> bool:
        return any(r.matches(c.property, c.layer, c.dtype) for c in cells)

    return [str(r) for r in unused if reachable(r, scope) or not reachable(r, universe)]


def _glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def precision_flags(opts: RunOptions) -> dict[str, object]:
    """The switches that change floating-point results, as pinned for this run."""
    flags: dict[str, object] = {
        "device": opts.device,
        "threads_per_cell": opts.threads,
        "mkldnn": opts.mkldnn,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    flags.update(opts.cuda_flags or {})
    return flags


def make_header(target: Target, opts: RunOptions, shard: str | None, argv: list[str]) -> RunHeader:
    try:
        target_version = target.version()
    except Exception as e:  # noqa: BLE001 - a version we cannot read is still a run
        target_version = f"unknown ({type(e).__name__})"
    device = opts.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name()})"
    return RunHeader(
        suite_version=__version__,
        target=target.name,
        target_version=target_version,
        torch_version=torch.__version__,
        python_version=platform.python_version(),
        platform=platform.platform(),
        device=device,
        precision_flags=precision_flags(opts),
        profile=opts.profile.name,
        seed=opts.seed,
        max_examples=opts.examples(),
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        shard=shard,
        argv=argv,
        hypothesis_version=hypothesis.__version__,
    )


def apply_xfail(result: CellResult, rules: list[XfailRule], used: set[str]) -> CellResult:
    """A failing cell listed in the xfails file becomes ``xfailed``; a listed cell that passes says so."""
    used.update(r.key for r in rules if str(r) in result.known_bug_examples)
    rule = match(rules, result.property, result.layer, result.dtype)
    if rule is None:
        return result
    used.add(rule.key)
    if result.status in ("failed", "error"):
        result.message = f"expected failure ({rule.reason}): {result.message}"
        result.status = "xfailed"
    elif result.status == "passed":
        result.message = f"XPASS: listed as expected failure ({rule.reason}) but passed"
    return result


@dataclass
class Run:
    target_name: str
    target: Target
    options: RunOptions  # as given; ``opts`` adds the xfails
    xfails: list[XfailRule]
    report: RunReport

    @property
    def opts(self) -> RunOptions:
        """The options cells run with: the xfails travel with them, so every worker (and a replay)
        sets the same examples aside and skips shrinking the same expected cells."""
        return with_xfails(self.options, self.xfails)

    def execute(
        self,
        cells: Iterable[Cell],
        jobs: int,
        sink: Callable[[CellResult], None],
        scope: Sequence[Cell] | None = None,
    ) -> RunReport:
        """Run ``cells``, handing each result to ``sink``; returns the report (partial when interrupted).

        ``scope``: the cells asked for before sharding (default: ``cells``); see :func:`_stale`.

        ``jobs`` worker processes run the cells (:mod:`properties.workers`): a target that crashes its
        process or hangs in native code costs a worker and becomes an ``error`` cell, and the run goes
        on. ``jobs=0`` runs them in this process, for debugging a target: a crash then ends the run."""
        used: set[str] = set()
        catalogue = all_properties()
        opts = self.opts
        cells = list(cells)
        scope = cells if scope is None else scope

        def done(result: CellResult) -> None:
            self.report.cells.append(apply_xfail(result, self.xfails, used))
            sink(result)

        try:
            if jobs == 0:
                for cell in cells:
                    done(run_cell(self.target, catalogue[cell.property], cell, opts))
            else:
                if jobs > 1:  # slow cells first keeps every worker busy until the end
                    cells = sorted(cells, key=lambda c: _cost(c, catalogue[c.property]), reverse=True)
                with WorkerPool(self.target_name, jobs, device=opts.device) as pool:
                    pool.run(cells, opts, done)
        except KeyboardInterrupt:
            self.report.header.interrupted = True
        finally:
            self.report.header.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self.report.header.unmatched_xfails = _stale(self.xfails, used, scope)
        return self.report


def _cost(cell: Cell, prop: Property) -> float:
    """A rough relative cost, to schedule slow cells first."""
    weight = {"train_dropout_unbiased": 8.0, "merge_cycle_drift": 3.0, "mixed_batch": 2.0}.get(prop.id, 1.0)
    return weight * {"conv3d": 3.0, "mha": 2.0, "conv2d": 1.5}.get(cell.layer, 1.0)


def with_xfails(opts: RunOptions, rules: list[XfailRule]) -> RunOptions:
    """Options carrying the xfails that change how a cell runs (so workers and replays agree)."""
    return replace(
        opts,
        known_bugs=example_rules(rules),
        expected_cells=cell_rules(rules),
    )


def start_run(target_name: str, opts: RunOptions, xfails: list[XfailRule], shard: str | None = None) -> Run:
    target = load_target(target_name)
    header = make_header(target, opts, shard, list(sys.argv))
    return Run(target_name, target, opts, xfails, RunReport(header))
