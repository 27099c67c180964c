"""``lora-conformance``: run the suite against a target, list targets and properties, handle reports.

Exit status: 0 nothing failed (xfails allowed), 1 a property failed or a target crashed, 2 a usage or
target error (unknown target, import failure), with a one-line reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

from properties.profiles import PROFILES

USAGE_ERROR = 2


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes i/n, got {text!r}") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 1 <= i <= n")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-conformance", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the property suite against a target")
    run.add_argument(
        "--target", default="auto", help="reference, peft, ... or module:attribute (default: auto)"
    )
    run.add_argument("--profile", choices=sorted(PROFILES), default="ci")
    run.add_argument("--max-examples", type=int, help="examples per cell (overrides the profile)")
    run.add_argument("--seed", type=int, help="global seed (default: 0 for ci, random otherwise; printed)")
    run.add_argument("--properties", type=_csv, help="comma-separated property ids")
    run.add_argument("--layers", type=_csv, help="comma-separated layer kinds and/or model architectures")
    run.add_argument("--dtypes", type=_csv, help="comma-separated dtypes")
    run.add_argument(
        "--xfails",
        default="auto",
        help="expected-failure file (property layer dtype  # reason); 'auto' (default) uses the file "
        "bundled for the target's release if there is one, 'none' uses none",
    )
    run.add_argument("--report", help="directory for report.json, report.md and report.html")
    run.add_argument("--baseline", help="a report.json to compare with; regressions fail the run")
    run.add_argument(
        "--max-growth", type=float, default=2.0, help="worst-ratio growth that counts as regression"
    )
    run.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="worker processes running cells (default 1); a crashing or hung target costs a worker, "
        "not the run. 0 runs cells in this process (for debugging: a crash ends the run)",
    )
    run.add_argument(
        "--cell-timeout", type=float, help="seconds before a cell counts as hung (default: profile)"
    )
    run.add_argument(
        "--example-timeout",
        type=float,
        help="seconds before one example counts as hung and ends its cell (default: profile, 30 s for ci)",
    )
    run.add_argument("--shard", type=_shard, help="run shard i of n (deterministic), e.g. 2/4")
    run.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    run.add_argument("--tf32", action="store_true", help="allow TF32 on CUDA (the precision model follows)")
    run.add_argument(
        "--no-reduced-precision-reduction",
        action="store_true",
        help="CUDA: forbid fp16/bf16 reduced-precision reductions (torch allows them by default)",
    )
    run.add_argument(
        "--mkldnn", action="store_true", help="leave oneDNN on for CPU convs (slower on tiny shapes)"
    )

    sub.add_parser("targets", help="list built-in targets with availability and version")
    sub.add_parser("properties", help="list property ids and statements")

    rep = sub.add_parser(
        "report", help="render the reports from a report.json, or rebuild them from a dead run's cells.jsonl"
    )
    rep.add_argument("json", help="report.json, or the cells.jsonl journal a killed run left")
    rep.add_argument("--out", help="output directory (default: the json's directory)")

    cmp_ = sub.add_parser("compare", help="compare two report.json files; exit 1 on regressions")
    cmp_.add_argument("baseline")
    cmp_.add_argument("current")
    cmp_.add_argument("--max-growth", type=float, default=2.0)

    merge = sub.add_parser("merge", help="merge the report.json files of a sharded run")
    merge.add_argument("shards", nargs="+")
    merge.add_argument("--out", required=True, help="directory for the merged reports")
    merge.add_argument("--allow-partial", action="store_true", help="merge even if shards are missing")
    return parser


def _auto_target() -> str:
    """PEFT when it is installed, else the built-in reference."""
    import importlib.util

    return "peft" if importlib.util.find_spec("peft") else "reference"


def cmd_run(args: argparse.Namespace) -> int:
    from properties import reporting
    from properties.console import Progress, closing_line, failure_details, skipped_reasons, summary_grid
    from properties.runner import RunOptions
    from properties.session import plan_cells, start_run
    from properties.targets.registry import TargetLoadError
    from properties.xfails import bundled_rules, for_release, load_xfails, record_xfails

    profile = PROFILES[args.profile]
    if args.cell_timeout:
        profile = dataclasses.replace(profile, cell_timeout_s=args.cell_timeout)
    if args.example_timeout:
        profile = dataclasses.replace(profile, example_timeout_s=args.example_timeout)
    if args.jobs < 0:
        return _usage(f"--jobs {args.jobs}: need 0 (in this process) or more workers")
    seed = args.seed if args.seed is not None else (0 if profile.derandomize else random.randrange(2**31))
    target_name = _auto_target() if args.target == "auto" else args.target
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return _usage(f"--device {args.device}: CUDA is not available on this machine")
    try:
        cells = plan_cells(args.properties, args.layers, args.dtypes, args.shard)
        xfails = load_xfails(None if args.xfails in ("auto", "none") else args.xfails)
    except (ValueError, OSError) as e:
        return _usage(str(e))
    opts = RunOptions(
        target=target_name,
        profile=profile,
        seed=seed,
        max_examples=args.max_examples,
        device=args.device,
        tf32=args.tf32,
        reduced_precision_reduction=args.device.startswith("cuda")
        and not args.no_reduced_precision_reduction,
        mkldnn=args.mkldnn,
        xfails=args.xfails,
    )
    shard = f"{args.shard[0]}/{args.shard[1]}" if args.shard else None
    try:
        run = start_run(target_name, opts, xfails, shard)
        run.target.capabilities()
    except TargetLoadError as e:
        return _usage(str(e))
    except Exception as e:  # noqa: BLE001 - a target that cannot describe itself is a target error
        return _usage(f"target {target_name!r} is not usable: {type(e).__name__}: {e}")
    header = run.report.header
    if args.xfails == "auto":
        bundled = bundled_rules(header.target, header.target_version)
        run.xfails = bundled.rules
        if bundled.rules:
            print(
                f"using the expected failures bundled for {header.target} {header.target_version}: "
                f"{bundled.describe()}"
            )
        if bundled.by_range:
            shown = "; ".join(map(str, bundled.by_range[:3])) + ("; ..." if len(bundled.by_range) > 3 else "")
            print(
                f"{len(bundled.by_range)} of them applied by release range, not verified on "
                f"{header.target_version} itself (all listed in the report): {shown}"
            )
    else:
        run.xfails = for_release(xfails, header.target, header.target_version)
    record_xfails(header, run.xfails, header.target, header.target_version)
    print(
        f"lora-conformance {header.suite_version}: target {header.target} {header.target_version}, "
        f"torch {header.torch_version}, {args.device}, profile {profile.name}, seed {seed}, "
        f"{len(cells)} cells, {args.jobs} job(s)",
        file=sys.stderr,
    )
    progress = Progress(len(cells))
    out_dir = Path(args.report) if args.report else None

    journal = reporting.Journal(out_dir, run.report) if out_dir else None
    last_write = {"at": time.perf_counter(), "cost": 0.0}

    def sink(result) -> None:
        progress(result)
        if journal is None:
            return
        journal.append(result)
        # report.json grows with every cell; rewriting it each time would cost O(cells^2). The journal
        # already holds the cell, so refresh the report only when that keeps its cost under 10%, and
        # at most every 10 s (the parent's CPU is the workers' on a 2-core CI machine).
        now = time.perf_counter()
        if now - last_write["at"] >= max(10.0, 10 * last_write["cost"]):
            reporting.write_reports(run.report, out_dir, formats=("json",))
            last_write["at"] = time.perf_counter()
            last_write["cost"] = last_write["at"] - now

    started = time.perf_counter()
    scope = plan_cells(args.properties, args.layers, args.dtypes) if args.shard else cells
    report = run.execute(cells, args.jobs, sink, scope=scope)
    print(summary_grid(report))
    details = failure_details(report)
    if details:
        print(details)
    skipped = skipped_reasons(report)
    if skipped:
        print("\nskipped:\n" + skipped)
    cells_unmatched = [x for x in report.header.unmatched_xfails if " when " not in x]
    examples_unmatched = [x for x in report.header.unmatched_xfails if " when " in x]
    if cells_unmatched:
        print("\nxfail lines that matched no cell: " + "; ".join(cells_unmatched))
    if examples_unmatched:
        print(
            "\nxfail 'when' lines that matched no example of this run (a rare case these examples did not "
            "draw, or a stale line): " + "; ".join(examples_unmatched)
        )
    if out_dir:
        paths = reporting.write_reports(report, out_dir)
        journal.close(remove=True)
        print(f"\nreports: {', '.join(str(p) for p in paths.values())}")
    status = 0 if report.ok else 1
    if args.baseline:
        comparison = reporting.compare(
            reporting.load_report(args.baseline), report, max_growth=args.max_growth
        )
        print("\n" + comparison.format())
        status = status or (0 if comparison.ok else 1)
    print(closing_line(report, time.perf_counter() - started))
    return 130 if report.header.interrupted else status


def cmd_targets(_: argparse.Namespace) -> int:
    from properties.targets.registry import BUILTIN, TargetLoadError, load_target

    for name in BUILTIN:
        try:
            t = load_target(name)
            caps = t.capabilities()
            layers = ",".join(sorted(caps.layers))
            print(f"{name:<12} available  {t.version():<12} layers: {layers}")
        except (TargetLoadError, ImportError, RuntimeError) as e:
            print(f"{name:<12} missing    {str(e).splitlines()[0]}")
    print("\nor any module:attribute implementing properties.targets.protocol.Target")
    return 0


def cmd_properties(_: argparse.Namespace) -> int:
    from properties.catalogue import all_properties

    for p in all_properties().values():
        needs = f"  [needs: {', '.join(sorted(p.requires))}]" if p.requires else ""
        print(f"{p.id:<24} {p.statement}{needs}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from properties import reporting

    try:
        report = reporting.load_report(args.json)
    except (OSError, reporting.ReportError) as e:
        return _usage(str(e))
    paths = reporting.write_reports(report, args.out or Path(args.json).parent)
    print("\n".join(str(p) for p in paths.values()))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from properties import reporting

    try:
        base, cur = reporting.load_report(args.baseline), reporting.load_report(args.current)
    except (OSError, reporting.ReportError) as e:
        return _usage(str(e))
    comparison = reporting.compare(base, cur, max_growth=args.max_growth)
    print(comparison.format())
    return 0 if comparison.ok else 1


def cmd_merge(args: argparse.Namespace) -> int:
    from properties import reporting

    try:
        merged = reporting.merge_reports([reporting.load_report(p) for p in args.shards], args.allow_partial)
    except (OSError, reporting.ReportError, reporting.ShardMergeError) as e:
        return _usage(str(e))
    paths = reporting.write_reports(merged, args.out)
    print("\n".join(str(p) for p in paths.values()))
    return 0 if merged.ok else 1


def _usage(message: str) -> int:
    print(f"lora-conformance: error: {message}", file=sys.stderr)
    return USAGE_ERROR


COMMANDS = {
    "run": cmd_run,
    "targets": cmd_targets,
    "properties": cmd_properties,
    "report": cmd_report,
    "compare": cmd_compare,
    "merge": cmd_merge,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)
