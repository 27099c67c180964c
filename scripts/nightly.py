"""The nightly profile, run and published: ``thorough`` against every library target, shard by shard.

A library that schedules the suite nightly runs ``--profile thorough`` (400 examples a cell), split
into ``--shard i/n`` jobs and put back together with ``lora-conformance merge``
(``examples/github-actions-nightly.yml``). This script does exactly that for the library targets
this repo ships, each in its own environment (``scripts/envs.py``; ``peft`` runs in this interpreter,
``peft-0.13.2`` in that release's env of ``scripts/peft_envs.py``),
and keeps per shard: the release tested, the counts of passed/failed/error/xfailed/skipped cells,
examples, the failed cells with their messages and replay lines, the xfail lines that matched
nothing, wall and CPU time, and the commit of the suite. Per library it merges the shards that ran
and estimates what the whole run costs and how many shards fit a 30-minute slot with ``--jobs 2``.

Records go to a JSON file rewritten atomically after every shard, so a run can be stopped and
resumed (shards already recorded for the same seed and shard count are skipped); ``--md`` renders it.
Several processes may share the file (each re-reads it under a lock before recording a shard), e.g.
one for the cheap libraries and one for a shard of each costly one.

    python scripts/nightly.py --libs loralib torchtune --shards 8 --only 1 --seed 1 \\
        --json docs/nightly.json --md docs/nightly.md        # one shard of each, to time them
    python scripts/nightly.py --libs loralib --shards 8 --seed 1   # the rest (recorded ones skipped)
    python scripts/nightly.py --libs peft-0.13.2 --shards 8 --only 1   # an older PEFT, in its env
    python scripts/nightly.py --render-only --json docs/nightly.json --md docs/nightly.md

Times are whatever the machine gives: on a shared machine, wall time overstates an idle run's, and
the CPU time (which counts every worker process) is the figure to plan a slot with.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from _runs import ROOT, Timed, fmt, git_commit, report_number, run_timed, write_atomic

LIBRARIES = (
    "loralib",
    "torchtune",
    "litgpt",
    "diffusers",
    "lycoris",
    "adapters",
    "keras",
    "peft",
    "reference",
)
IN_THIS_INTERPRETER = ("peft", "reference")  # PEFT: the release CI tests; reference: the suite itself
PEFT_RELEASE = "peft-"  # ``peft-0.13.2``: PEFT's target run in that release's env (scripts/peft_envs.py)
REPORTS = ROOT / "reports" / "nightly"  # git-ignored
SLOT_S = 30 * 60  # the nightly slot a library gives the suite
SLOT_JOBS = 2  # workers per shard in that slot (a 2-core runner)


def run_command(
    lib: str,
    shard: tuple[int, int],
    seed: int,
    jobs: int,
    report: Path,
    extra: list[str],
    limits: Sequence[str] = (),
) -> list[str]:
    """The command that runs one shard of ``lib``'s thorough profile (in its environment)."""
    target = "peft" if lib.startswith(PEFT_RELEASE) else lib
    cli = ["-m", "properties", "run", "--target", target, "--profile", "thorough", "--seed", str(seed)]
    cli += ["--shard", f"{shard[0]}/{shard[1]}", "--jobs", str(jobs), "--report", str(report)]
    cli += [*extra, *limits]
    if lib in IN_THIS_INTERPRETER:
        return [sys.executable, *cli]
    if lib.startswith(PEFT_RELEASE):
        version = lib[len(PEFT_RELEASE) :]
        return [sys.executable, str(ROOT / "scripts" / "peft_envs.py"), "run", version, "--", "python", *cli]
    return [sys.executable, str(ROOT / "scripts" / "envs.py"), "run", lib, "--", "python", *cli]


def _run_fields(
    lib: str, shard: tuple[int, int], seed: int, timed: Timed, extra: list[str], limits: Sequence[str]
) -> dict:
    """What every shard record holds, whether or not the run left a report: which run, and its cost."""
    return {
        "lib": lib,
        "shard": f"{shard[0]}/{shard[1]}",
        "seed": seed,
        "extra_args": extra,
        "limits": list(limits),
        "commit": git_commit(),
        "exit_status": timed.returncode,
        "wall_s": round(timed.wall_s, 1),
        "cpu_s": round(timed.cpu_s, 1),
    }


def shard_record(
    report: dict,
    lib: str,
    shard: tuple[int, int],
    seed: int,
    timed: Timed,
    extra: list[str],
    out: Path,
    limits: Sequence[str] = (),
) -> dict:
    """What one shard's report.json says, and what the shard cost."""
    header, cells = report["header"], report["cells"]
    failures = [
        {
            "cell": f"{c['property']} {c['layer']} {c['dtype']}",
            "status": c["status"],
            "message": (c.get("message") or "")[:2000],
            "replay": c.get("replay"),
        }
        for c in cells
        if c["status"] in ("failed", "error")
    ]
    # The worst ratio of the cells that passed: an xfailed cell's ratio measures a known bug.
    ratios = [
        r for c in cells if c["status"] == "passed" and (r := report_number(c.get("max_ratio"))) is not None
    ]
    return _run_fields(lib, shard, seed, timed, extra, limits) | {
        "version": header.get("target_version"),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cells": len(cells),
        "counts": report.get("counts"),
        "examples": sum(c.get("examples", 0) for c in cells),
        "known_bug_examples": sum(sum(c.get("known_bug_examples", {}).values()) for c in cells),
        "worst_ratio": max(ratios, default=None),
        "failures": failures,
        "unmatched_xfails": header.get("unmatched_xfails", []),
        "report": _shown(out),
    }


def _report_dir(reports: Path, lib: str, shard: tuple[int, int], seed: int, extra: list[str]) -> Path:
    """``<reports>/<lib>-seed<seed>[-<hash of extra args>]/shard-<i>-of-<n>`` (git-ignored)."""
    run = f"{lib}-seed{seed}" + (f"-{zlib.crc32(' '.join(extra).encode()):08x}" if extra else "")
    return reports / run / f"shard-{shard[0]}-of-{shard[1]}"


def run_shard(
    reports: Path,
    lib: str,
    shard: tuple[int, int],
    seed: int,
    jobs: int,
    extra: list[str],
    limits: Sequence[str] = (),
) -> dict:
    """Run one shard and record it. ``limits`` (hang limits) go to the CLI but not into the run's key:
    they decide when a slow example is called a hang, not what is tested, so a shard run with longer
    limits on a loaded machine completes the same run as the shards recorded without them."""
    out = _report_dir(reports, lib, shard, seed, extra)
    load_start = os.getloadavg()[0]
    timed = run_timed(run_command(lib, shard, seed, jobs, out, extra, limits))
    load = {"load_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)]}
    path = out / "report.json"
    if not path.exists():
        error = {"error": (timed.stderr or timed.stdout)[-2000:]}
        return load | _run_fields(lib, shard, seed, timed, extra, limits) | error
    return shard_record(json.loads(path.read_text()), lib, shard, seed, timed, extra, out, limits) | load


def planned_cells(n: int, extra: list[str]) -> dict[str, int]:
    """Cells of each shard ``i/n``, read from the extra CLI arguments by the CLI's own parser."""
    sys.path.insert(0, str(ROOT))
    from properties.cli import build_parser
    from properties.session import plan_cells

    args = build_parser().parse_args(["run", *extra])
    return {
        f"{i}/{n}": len(plan_cells(args.properties, args.layers, args.dtypes, (i, n)))
        for i in range(1, n + 1)
    }


def merge_shards(reports: Path, lib: str, seed: int, n: int, extra: list[str]) -> Path | None:
    """``lora-conformance merge`` of the shards of ``lib`` that wrote a report (partial if some did not).

    The merged ``report.{json,md,html}`` is what a library's nightly job publishes; returns its json, or
    None when no shard's report is on this machine (the JSON record still has every shard's counts)."""
    shards = [_report_dir(reports, lib, (i, n), seed, extra) / "report.json" for i in range(1, n + 1)]
    found = [p for p in shards if p.exists()]
    if not found:
        return None
    sys.path.insert(0, str(ROOT))
    from properties import reporting  # what `lora-conformance merge` runs, without starting a process

    out = _report_dir(reports, lib, (0, n), seed, extra).with_name(f"merged-of-{n}")
    merged = reporting.merge_reports([reporting.load_report(p) for p in found], allow_partial=len(found) < n)
    # report.html (matplotlib) costs seconds a time: written once the run is whole, not after every shard.
    formats = ("json", "md", "html") if len(found) == n else ("json", "md")
    return reporting.write_reports(merged, out, formats)["json"]


def library_summary(reports: Path, records: list[dict], n: int) -> dict:
    """One library's recorded shards of one run: merged counts, cost, and the estimate of a whole run."""
    done = [r for r in records if "error" not in r]
    lib, seed, extra = records[0]["lib"], records[0]["seed"], records[0].get("extra_args", [])
    merged_path = merge_shards(reports, lib, seed, n, extra) if done else None
    counts: dict[str, int] = {}
    for r in done:
        for status, k in (r.get("counts") or {}).items():
            counts[status] = counts.get(status, 0) + k
    per_shard = planned_cells(n, extra)
    cells_done = sum(r["cells"] for r in done)
    cells_all = sum(per_shard.values())
    cpu, wall = sum(r["cpu_s"] for r in done), sum(r["wall_s"] for r in done)
    loads = [x for r in done for x in r.get("load_1min_start_end", [])]  # older records have none
    # A shard's cost is roughly proportional to its cells: scale the measured CPU time to every cell.
    cpu_full = cpu * cells_all / cells_done if cells_done else None
    # Idle wall time with --jobs 2 on a 2-core runner is at best half the CPU time.
    wall_full_idle = cpu_full / SLOT_JOBS if cpu_full else None
    # A line is unmatched only if no shard used it (as `merge` says): meaningful once every shard ran.
    unmatched = None
    if len(done) == n:
        unmatched = [x for x in done[0]["unmatched_xfails"] if all(x in r["unmatched_xfails"] for r in done)]
    return {
        "lib": lib,
        "version": done[0]["version"] if done else None,
        "shards": n,
        "shards_run": sorted(r["shard"] for r in done),
        "shards_failed_to_run": sorted(r["shard"] for r in records if "error" in r),
        "merged_report": _shown(merged_path) if merged_path else None,
        "cells_run": cells_done,
        "cells_planned": cells_all,
        "counts": counts,
        "examples": sum(r["examples"] for r in done),
        "known_bug_examples": sum(r["known_bug_examples"] for r in done),
        "failures": [f | {"shard": r["shard"]} for r in done for f in r["failures"]],
        "unmatched_xfails": unmatched,
        "worst_ratio": max((r["worst_ratio"] for r in done if r["worst_ratio"] is not None), default=None),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "load_1min_range": [min(loads), max(loads)] if loads else None,
        "estimated_full_cpu_s": round(cpu_full) if cpu_full else None,
        "estimated_full_wall_s_jobs2_idle": round(wall_full_idle) if wall_full_idle else None,
        "shards_for_30_min": math.ceil(wall_full_idle / SLOT_S) if wall_full_idle else None,
        "commits": sorted({r["commit"] for r in done}),
    }


def summaries(data: dict, reports: Path) -> list[dict]:
    """One summary per (library, seed, shard count) that has records."""
    groups: dict[tuple, list[dict]] = {}
    for r in data["runs"]:
        n = int(r["shard"].split("/")[1])
        groups.setdefault((r["lib"], r["seed"], n, tuple(r.get("extra_args", []))), []).append(r)
    out = []
    for (_, seed, n, extra), records in sorted(
        groups.items(), key=lambda kv: (LIBRARIES.index(kv[0][0]), kv[0][1:])
    ):
        out.append({"seed": seed, "extra_args": list(extra), **library_summary(reports, records, n)})
    return out


def render_md(data: dict) -> str:
    lines = [
        "# Nightly (`thorough`) runs of the library targets",
        "",
        "Generated by `scripts/nightly.py` from `docs/nightly.json`: `--profile thorough` (400 examples a "
        "cell, fewer for costly properties), each library in its own environment with its bundled xfails, "
        "split with `--shard i/n` and merged. Wall time is measured on whatever the machine was doing; CPU "
        "time counts every worker process. The full-run estimate scales the CPU time of the shards that "
        "ran to every cell, and the idle wall time of `--jobs 2` on a 2-core runner is taken as half of it.",
        "",
        f"Command: `{data.get('command', '')}`",
        "",
        "| library | release | seed | shards run | cells run / all | passed | failed | error | xfailed | "
        "skipped | examples | worst ratio | unmatched xfail lines | wall | load (1 min) | CPU | "
        "est. full run, idle, `--jobs 2` | shards for 30 min | commit |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---|",
    ]
    for s in data.get("summaries", []):
        c = s["counts"]
        run = f"{len(s['shards_run'])} of {s['shards']}"
        if s["shards_failed_to_run"]:
            run += f" ({len(s['shards_failed_to_run'])} failed to run)"
        unmatched = "—" if s["unmatched_xfails"] is None else (", ".join(s["unmatched_xfails"]) or "none")
        est = s["estimated_full_wall_s_jobs2_idle"]
        lines.append(
            f"| {s['lib']}{_extra(s)} | {s['version']} | {s['seed']} | {run} | {s['cells_run']} / "
            f"{s['cells_planned']} | {c.get('passed', 0)} | {c.get('failed', 0)} | {c.get('error', 0)} | "
            f"{c.get('xfailed', 0)} | {c.get('skipped', 0)} | {s['examples']} | {fmt(s['worst_ratio'])} | "
            f"{unmatched} | {_minutes(s['wall_s'])} | {_load_span(s.get('load_1min_range'))} | "
            f"{_minutes(s['cpu_s'])} | {_minutes(est)} | "
            f"{s['shards_for_30_min'] or '—'} | {', '.join(s['commits'])} |"
        )
    lines += [
        "",
        "Unmatched xfail lines are listed only once every shard ran (a line is stale only if no shard "
        "used it). Load is the machine's 1-minute load average read at the start and end of each shard "
        "(— for shards recorded before it was kept).",
        "",
    ]
    notes = data.get("notes", [])  # what the table cannot say (kept by hand in the JSON)
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    failures = [(s, f) for s in data.get("summaries", []) for f in s["failures"]]
    lines += [f"## Failed and error cells: {len(failures)}", ""]
    for s, f in failures:
        lines.append(
            f"- {s['lib']} {s['version']} shard {f['shard']}: `{f['cell']}` {f['status']}: "
            f"{f['message'].splitlines()[0] if f['message'] else ''}"
        )
        if f.get("replay"):
            lines.append(f"  replay: `{f['replay']}`")
    superseded = data.get("superseded", [])  # records replaced by a re-run after a suite fix (kept by hand)
    if superseded:
        lines += ["", "## Superseded shard records (re-run after a fix of the suite)", ""]
        for r in superseded:
            cells = "; ".join(f"`{f['cell']}` {f['status']}" for f in r.get("failures", []))
            lines.append(f"- {r['lib']} shard {r['shard']} at {r.get('commit')}: {r.get('counts')} {cells}")
    missing = [r for r in data["runs"] if "error" in r]
    if missing:
        lines += ["", "## Shards that wrote no report", ""]
        lines += [
            f"- {r['lib']} shard {r['shard']} (exit {r['exit_status']}): "
            f"{r['error'].strip().splitlines()[-1] if r['error'].strip() else ''}"
            for r in missing
        ]
    return "\n".join(lines) + "\n"


def _shown(path: Path) -> str:
    """``path`` relative to the repo when inside it: the JSON is committed, absolute paths are not."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _extra(s: dict) -> str:
    return f" ({' '.join(s['extra_args'])})" if s["extra_args"] else ""


def _load_span(span: list[float] | None) -> str:
    """The 1-minute load average over a library's shards (read at each shard's start and end)."""
    return "—" if not span else f"{span[0]:.1f}–{span[1]:.1f}"


def _minutes(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds / 60:.1f} min"


def _library(name: str) -> str:
    """A library of :data:`LIBRARIES`, or ``peft-<version>`` for an older PEFT release's env."""
    if name in LIBRARIES or (name.startswith(PEFT_RELEASE) and name[len(PEFT_RELEASE) :][:1].isdigit()):
        return name
    raise argparse.ArgumentTypeError(f"{name!r}: one of {', '.join(LIBRARIES)}, or {PEFT_RELEASE}VERSION")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--libs",
        nargs="+",
        type=_library,
        default=list(LIBRARIES),
        help=f"{', '.join(LIBRARIES)}, or {PEFT_RELEASE}VERSION: a bundled PEFT release in its env "
        "(python scripts/peft_envs.py create --overlay VERSION)",
    )
    ap.add_argument("--shards", type=int, default=8, help="n in --shard i/n")
    ap.add_argument("--only", default=None, help="comma-separated shard indices to run now (default: all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "nightly.json")
    ap.add_argument("--reports", type=Path, default=REPORTS, help="where shard and merged reports go")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--cell-timeout", type=float, default=None, help="passed on; not part of the run")
    ap.add_argument("--example-timeout", type=float, default=None, help="passed on; not part of the run")
    ap.add_argument("--render-only", action="store_true", help="only rewrite --md from --json")
    ap.add_argument("extra", nargs="*", help="more arguments for `lora-conformance run` (after --)")
    args = ap.parse_args(argv)
    command = "python scripts/nightly.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if not args.render_only:
        indices = [int(i) for i in args.only.split(",")] if args.only else range(1, args.shards + 1)
        limits = [
            f"--{name}-timeout={value:g}"
            for name, value in (("cell", args.cell_timeout), ("example", args.example_timeout))
            if value is not None
        ]
        for lib in args.libs:
            for i in indices:
                key = (lib, f"{i}/{args.shards}", args.seed, tuple(args.extra))
                with _locked(args.json):
                    if any(_key(r) == key and "error" not in r for r in _load(args.json)["runs"]):
                        continue
                record = run_shard(
                    args.reports, lib, (i, args.shards), args.seed, args.jobs, args.extra, limits
                )
                with _locked(args.json):  # re-read: another nightly.py may have recorded shards meanwhile
                    data = _load(args.json)
                    data["runs"] = [r for r in data["runs"] if _key(r) != key] + [record]
                    data["command"] = command
                    _save(args.json, data, args.reports)
                print(_line(record), flush=True)
    with _locked(args.json):
        data = _load(args.json)
        _save(args.json, data, args.reports)
    if args.md:
        write_atomic(args.md, render_md(data))
    return 1 if any(s["failures"] or s["shards_failed_to_run"] for s in data["summaries"]) else 0


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": []}


def _save(path: Path, data: dict, reports: Path) -> None:
    data["summaries"] = summaries(data, reports)
    write_atomic(path, json.dumps(data, indent=1) + "\n")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock next to ``path``: several nightly.py processes may share one record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _key(r: dict) -> tuple:
    return (r["lib"], r["shard"], r["seed"], tuple(r.get("extra_args", [])))


def _line(r: dict) -> str:
    head = f"{r['lib']} shard {r['shard']} seed {r['seed']}: "
    if "error" in r:
        return head + f"no report (exit {r['exit_status']}), {r['wall_s']:.0f} s"
    return head + f"{r['counts']}, exit {r['exit_status']}, {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU"


if __name__ == "__main__":
    raise SystemExit(main())
