"""The soundness sweep: the reference over many seeds, every property, layer and dtype.

A correct implementation must never fail. One seed proves little; this runs the built-in reference
over ``--ci-seeds`` seeds of the ``ci`` profile and ``--thorough-seeds`` seeds of ``thorough``
(each through the CLI with ``--jobs``), and records per run the seed, cells, examples, alarms
(failed or error cells, with their messages and replay lines), the worst error ratio overall and per
dtype (float64 is the reference's exact-arithmetic path: how close its worst ratio comes to 1 says how
tight the model is there), the largest bias z, the examples set aside as outside the claim, and the
time. Results go to a JSON file, rewritten atomically after every run, so a sweep can be stopped and
resumed (runs already recorded are skipped); ``--md`` renders the summary.

    python scripts/soundness_sweep.py --ci-seeds 100 --thorough-seeds 3 --jobs 2 \\
        --json docs/soundness-sweep.json --md docs/soundness.md
    python scripts/soundness_sweep.py --shard 1/2 ...   # every other run, for a second machine

Timings are wall-clock on whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _runs import ROOT, fmt, report_number, run_timed, write_atomic


def runs(ci_seeds: int, thorough_seeds: int, first_seed: int) -> list[tuple[str, int]]:
    """(profile, seed) pairs, thorough interleaved early so a cut-short sweep still has some."""
    ci = [("ci", first_seed + i) for i in range(ci_seeds)]
    th = [("thorough", first_seed + i) for i in range(thorough_seeds)]
    out: list[tuple[str, int]] = []
    while ci or th:
        out += ci[:10]
        ci = ci[10:]
        if th:
            out.append(th.pop(0))
    return out


def run_one(profile: str, seed: int, jobs: int, extra: list[str]) -> dict:
    """One CLI run of the reference; the facts the sweep keeps."""
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        cmd = [sys.executable, "-m", "properties", "run", "--target", "reference", "--profile", profile]
        cmd += ["--seed", str(seed), "--jobs", str(jobs), "--report", tmp, *extra]
        proc = run_timed(cmd)
        seconds = proc.wall_s
        report_path = Path(tmp) / "report.json"
        if not report_path.exists():
            return {"profile": profile, "seed": seed, "error": proc.stderr[-2000:], "seconds": seconds}
        report = json.loads(report_path.read_text())
    record = summarize(report, profile, seed, seconds, proc.returncode)
    if extra:
        record["extra_args"] = extra
    return record


def _cell(c: dict) -> str:
    return f"{c['property']} {c['layer']} {c['dtype']}"


def summarize(report: dict, profile: str, seed: int, seconds: float, rc: int) -> dict:
    cells = report["cells"]
    worst: dict[str, float] = {}
    for c in cells:
        r = report_number(c.get("max_ratio"))
        if r is not None:
            worst[c["dtype"]] = max(worst.get(c["dtype"], 0.0), r)
    alarms = [
        {
            "cell": _cell(c),
            "status": c["status"],
            "message": c.get("message"),
            "replay": c.get("replay"),
        }
        for c in cells
        if c["status"] in ("failed", "error")
    ]
    bias = [(report_number(c.get("max_bias_z")) or 0.0, _cell(c)) for c in cells]
    top_bias = max(bias, default=(0.0, ""))
    return {
        "profile": profile,
        "seed": seed,
        "exit_status": rc,
        "cells": len(cells),
        "counts": report.get("counts"),
        "examples": sum(c.get("examples", 0) for c in cells),
        "alarms": alarms,
        "worst_ratio": max(worst.values(), default=None),
        "worst_ratio_by_dtype": worst,
        "max_bias_z": top_bias[0],
        "max_bias_z_cell": top_bias[1],
        "out_of_range_examples": sum(sum(c.get("out_of_range_examples", {}).values()) for c in cells),
        "seconds": round(seconds, 1),
    }


def _label(record: dict) -> str:
    """The profile, with the run's extra CLI arguments when it covered part of the matrix."""
    extra = record.get("extra_args")
    return record["profile"] + (f" ({' '.join(extra)})" if extra else "")


def totals(records: list[dict]) -> dict:
    """The sweep in one line per profile."""
    out = {}
    for profile in sorted({_label(r) for r in records}):
        rs = [r for r in records if _label(r) == profile and "error" not in r]
        by_dtype: dict[str, float] = {}
        for r in rs:
            for d, v in r["worst_ratio_by_dtype"].items():
                by_dtype[d] = max(by_dtype.get(d, 0.0), v)
        out[profile] = {
            "runs": len(rs),
            "seeds": sorted(r["seed"] for r in rs),
            "cells": sum(r["cells"] for r in rs),
            "examples": sum(r["examples"] for r in rs),
            "alarms": sum(len(r["alarms"]) for r in rs),
            "worst_ratio": max((r["worst_ratio"] or 0.0 for r in rs), default=None),
            "worst_ratio_by_dtype": by_dtype,
            "max_bias_z": max((r["max_bias_z"] for r in rs), default=None),
            "out_of_range_examples": sum(r["out_of_range_examples"] for r in rs),
            "seconds": round(sum(r["seconds"] for r in rs), 1),
            "failed_to_run": [r["seed"] for r in records if _label(r) == profile and "error" in r],
        }
    return out


def render_md(data: dict) -> str:
    from properties.bias import Z_THRESHOLD

    lines = [
        "# Soundness sweep of the reference",
        "",
        "Generated by `scripts/soundness_sweep.py` from `docs/soundness-sweep.json`. A correct "
        "implementation must never fail: every alarm here is a defect of the suite, fixed at its root.",
        "",
        f"Command: `{data.get('command', '')}`",
        "",
        "| profile | runs (seeds) | cells | examples | alarms | worst ratio | worst ratio float64 | "
        f"max bias z (fires > {Z_THRESHOLD:.2f}) | examples outside the claim | time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for profile, t in data["totals"].items():
        seeds = t["seeds"]
        span = f"{seeds[0]}–{seeds[-1]}" if seeds else "—"
        f64 = t["worst_ratio_by_dtype"].get("float64")
        lines.append(
            f"| {profile} | {t['runs']} ({span}) | {t['cells']} | {t['examples']} | {t['alarms']} | "
            f"{fmt(t['worst_ratio'])} | {fmt(f64)} | {fmt(t['max_bias_z'])} | "
            f"{t['out_of_range_examples']} | {t['seconds'] / 60:.1f} min |"
        )
    lines += ["", "Worst ratio per dtype:", ""]
    for profile, t in data["totals"].items():
        per = ", ".join(f"{d} {fmt(v)}" for d, v in sorted(t["worst_ratio_by_dtype"].items()))
        lines.append(f"- {profile}: {per}")
    alarms = [(r["profile"], r["seed"], a) for r in data["runs"] for a in r.get("alarms", [])]
    lines += ["", f"Alarms: {len(alarms)}", ""]
    for profile, seed, a in alarms:
        lines.append(f"- {profile} seed {seed}: `{a['cell']}` {a['status']}: {a['message']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ci-seeds", type=int, default=100)
    ap.add_argument("--thorough-seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--shard", default="1/1", help="i/n: every n-th run starting at the i-th")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "soundness-sweep.json")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--render-only", action="store_true", help="only rewrite --md from --json")
    ap.add_argument("extra", nargs="*", help="more arguments for `lora-conformance run` (after --)")
    args = ap.parse_args(argv)
    data = json.loads(args.json.read_text()) if args.json.exists() else {"runs": []}
    if not args.render_only:
        i, n = (int(p) for p in args.shard.split("/"))
        todo = runs(args.ci_seeds, args.thorough_seeds, args.first_seed)[i - 1 :: n]
        # A run counts as done only with the same extra arguments (a layer-only run is not a full one).
        done = {
            (r["profile"], r["seed"])
            for r in data["runs"]
            if "error" not in r and (r.get("extra_args") or []) == list(args.extra)
        }
        data["command"] = "python scripts/soundness_sweep.py " + " ".join(argv or sys.argv[1:])
        for profile, seed in todo:
            if (profile, seed) in done:
                continue
            record = run_one(profile, seed, args.jobs, args.extra)
            data["runs"] = [
                r
                for r in data["runs"]
                if (r["profile"], r["seed"], r.get("extra_args") or []) != (profile, seed, list(args.extra))
            ]
            data["runs"].append(record)
            data["totals"] = totals(data["runs"])
            write_atomic(args.json, json.dumps(data, indent=1) + "\n")
            alarms = len(record.get("alarms", [])) if "error" not in record else "run failed"
            print(
                f"{profile} seed {seed}: alarms {alarms}, worst ratio {record.get('worst_ratio')}, "
                f"bias z {record.get('max_bias_z')}, {record['seconds']:.0f}s",
                flush=True,
            )
    data["totals"] = totals(data["runs"])
    write_atomic(args.json, json.dumps(data, indent=1) + "\n")
    if args.md:
        sys.path.insert(0, str(ROOT))
        write_atomic(args.md, render_md(data))
    return 1 if any(t["alarms"] for t in data["totals"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
