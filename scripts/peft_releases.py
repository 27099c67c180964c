"""Check every PEFT minor release: the repro scripts of the findings, and the ``ci`` gate, one env each.

Usage::

    python scripts/peft_envs.py create 0.7.1 0.8.2 ...          # once per release (see RELEASES)
    python scripts/peft_releases.py repro [VERSION...] [--json FILE]
    python scripts/peft_releases.py gate [VERSION...] --out DIR [--jobs 1] [--nice 10]
    python scripts/peft_releases.py table DIR
    python scripts/peft_releases.py repro-table FILE.json

``repro`` runs every ``findings/repro/peft_*.py`` inside ``envs/peft-<version>`` and prints one row per
script: ``FAIL`` (exit 1, the bug is there), ``OK`` (exit 0 and an OK line) or ``N/A`` (exit 0 and the
release cannot build that layer or option). These are the observations that fix the ends of each known
bug's release range (``[peft>=A,<B]`` in ``properties/targets/xfails/``): A is the first release that
fails, B the first that passes again.

``gate`` runs ``lora-conformance run --target peft --profile ci`` (bundled expected failures, applied by
release range) in each env, one release after another, writing ``DIR/<version>/report.json`` and the wall
time in ``DIR/<version>/wall.json``. ``table`` turns those into the table of ``docs/peft-releases.md``.
The suite runs as ``<env>/bin/python -m properties`` (this checkout, installed editable by
``peft_envs.py create``; ``PYTHONPATH`` passes through), and a report of any other PEFT release than the
one asked for is refused (exit 2, "not counted" in the table).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _venv
import peft_envs

# One patch release per minor, 0.7 to 0.21: the newest patch of each minor.
RELEASES = [
    "0.7.1",
    "0.8.2",
    "0.9.0",
    "0.10.0",
    "0.11.1",
    "0.12.0",
    "0.13.2",
    "0.14.0",
    "0.15.2",
    "0.16.0",
    "0.17.1",
    "0.18.1",
    "0.19.1",
    "0.20.0",
    "0.21.2",
]

REPRO = _venv.REPO / "findings" / "repro"
LOAD_SAMPLE_S = 30  # how often a gate samples the 1-minute load average


def _verdict(rc: int, out: str) -> str:
    last = out.strip().splitlines()[-1] if out.strip() else ""
    if rc == 1:
        return "FAIL"
    if rc == 0:
        return "N/A" if ": N/A" in last else "OK"
    return f"exit {rc}"


# Runs inside a release's env: each repro script in turn in one interpreter (importing PEFT and
# transformers once instead of once per script), each as __main__, its exit status and output captured.
_DRIVER = """
import contextlib, io, json, runpy, sys, traceback
out = {}
for path in sys.argv[1:]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            runpy.run_path(path, run_name="__main__")
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 2
    out[path] = [rc, buf.getvalue()]
print("@@REPRO@@" + json.dumps(out))
"""


def _installed_peft() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return None


def repro(versions: list[str], json_path: str | None, only: str = "*") -> int:
    """Run each PEFT repro script (``only``: globs on its name, comma-separated) in each release's env;
    print the matrix (and merge it into a JSON file)."""
    scripts = sorted({s for glob in only.split(",") for s in REPRO.glob(f"peft_{glob.strip()}.py")})
    rows: dict[str, dict[str, dict[str, str]]] = {s.stem: {} for s in scripts}
    for v in versions:
        python = _venv.python_of(peft_envs.env_dir(v))
        if not python.exists() and _installed_peft() == v:
            python = Path(sys.executable)  # this interpreter has that very release
        if not python.exists():
            print(f"peft {v}: no env (python scripts/peft_envs.py create {v})", file=sys.stderr)
            continue
        relative = str(max(0, 10 - os.nice(0)))  # niceness 10 whatever this script's own
        cmd = ["nice", "-n", relative, str(python), "-W", "ignore", "-c", _DRIVER, *map(str, scripts)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=_venv.REPO)
        marker = next((ln for ln in p.stdout.splitlines() if ln.startswith("@@REPRO@@")), None)
        if marker is None:
            print(f"peft {v}: the driver failed (exit {p.returncode}): {p.stderr[-500:]}", file=sys.stderr)
            continue
        results = json.loads(marker[len("@@REPRO@@") :])
        for s in scripts:
            rc, out = results[str(s)]
            last = out.strip().splitlines()[-1] if out.strip() else ""
            rows[s.stem][v] = {"verdict": _verdict(rc, out), "exit": str(rc), "last_line": last[:200]}
            print(f"{v:8} {s.stem:40} {rows[s.stem][v]['verdict']:5} {last[:120]}", flush=True)
    header = "| script | " + " | ".join(versions) + " |"
    print("\n" + header + "\n|---|" + "---|" * len(versions))
    for name, by in rows.items():
        print(f"| {name} | " + " | ".join(by.get(v, {}).get("verdict", "-") for v in versions) + " |")
    if json_path:
        old = json.loads(Path(json_path).read_text()) if Path(json_path).exists() else {}
        for name, by in rows.items():
            old.setdefault(name, {}).update(by)
        Path(json_path).write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    return 0


def gate_command(version: str, report: Path, jobs: int, relative_nice: int, extra: list[str]) -> list[str]:
    """The ci run of one release, by the absolute path of its env's interpreter (``python -m properties``).

    Not the env's ``lora-conformance`` script: its ``#!`` names the interpreter of the checkout that
    created the env, and once that path is gone ``execvp`` skips the script and takes the next
    ``lora-conformance`` on PATH, the global one, which runs this interpreter's PEFT (0.21.2) under the
    release's name (second session, 2026-12-02: a "0.7.1" gate reported 0.21.2).
    """
    python = _venv.python_of(peft_envs.env_dir(version))
    cmd = ["nice", "-n", str(relative_nice), str(python), "-m", "properties", "run"]
    return cmd + ["--target", "peft", "--profile", "ci", "--jobs", str(jobs), "--report", str(report), *extra]


def release_mismatch(version: str, report_dir: Path) -> str | None:
    """What is wrong if the report in ``report_dir`` is not a run against PEFT ``version``, else ``None``."""
    rpath = report_dir / "report.json"
    if not rpath.exists():
        return None  # no report at all: the exit status says why
    ran = json.loads(rpath.read_text())["header"].get("target_version")
    return None if ran == version else f"the report is of peft {ran}, not {version}"


def gate(versions: list[str], out: Path, jobs: int, niceness: int, extra: list[str]) -> int:
    """The ci gate against each release, one after another; returns 1 if any gate failed, 2 if a gate
    ran another release than the one asked for."""
    worst = 0
    wrong_any = False
    for v in versions:
        d = out / v
        d.mkdir(parents=True, exist_ok=True)
        # --nice is the niceness the run ends with, whatever this script's own (`nice -n 10 python
        # peft_releases.py gate` would otherwise add the two and run the gate at 19).
        relative = max(0, niceness - os.nice(0))
        cmd = gate_command(v, d.resolve(), jobs, relative, extra)
        start = time.monotonic()
        loads: list[float] = []
        with open(d / "console.txt", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("peft_envs.py")), "run", v, "--", *cmd],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            while True:  # sample the machine's load while the gate runs: a loaded wall time says so
                loads.append(os.getloadavg()[0])
                try:
                    rc = proc.wait(timeout=LOAD_SAMPLE_S)
                    break
                except subprocess.TimeoutExpired:
                    continue
        wall = time.monotonic() - start
        record = {
            "version": v,
            "exit": rc,
            "wall_s": round(wall, 1),
            "command": " ".join(cmd[3:]),
            "extra": extra,
            "load_min": round(min(loads), 1),
            "load_max": round(max(loads), 1),
        }
        wrong = release_mismatch(v, d)
        if wrong:
            record["wrong_release"] = wrong
            wrong_any = True
        (d / "wall.json").write_text(json.dumps(record) + "\n")
        print(f"peft {v}: exit {rc}, {wall:.0f} s" + (f" -- {wrong}" if wrong else ""), flush=True)
        worst = max(worst, rc)
    return 2 if wrong_any else (1 if worst else 0)


def _applied_rule(applied: str) -> tuple[str, str, str] | None:
    """``(property, layer, dtype)`` globs of a whole-cell line as a report header lists it
    (``line N: [range] prop layer dtype (from FILE)``), or ``None`` for a ``when`` line."""
    body = applied.split(": ", 1)[1].rsplit(" (from ", 1)[0]
    if body.startswith("["):
        body = body.split("] ", 1)[1]
    fields = body.split(" when ", 1)
    return None if len(fields) > 1 else tuple(fields[0].split()[:3])


def xfail_split(report: dict) -> tuple[int, int, int, int]:
    """How many xfailed cells and set-aside examples came from lines verified on the run's release, and
    how many from lines applied by range: ``(cells verified, cells by range, examples verified, examples
    by range)``. A whole cell is credited to the first whole-cell line that matches it, as the run does; a
    cell that no whole-cell line matches ended xfailed because every example it drew matched a ``when``
    line, so it counts as verified only if one of those lines was verified on the release."""
    h = report["header"]
    by_range = set(h.get("xfails_by_range", []))
    whole = [(a, r) for a in h.get("xfails_applied", []) if (r := _applied_rule(a)) is not None]
    cells = [0, 0]
    examples = [0, 0]
    for c in report["cells"]:
        for line, n in c.get("known_bug_examples", {}).items():
            examples[line in by_range] += n
        if c["status"] != "xfailed":
            continue
        line = next(
            (a for a, r in whole if all(fnmatch.fnmatchcase(v, p) for v, p in zip(_cell(c), r, strict=True))),
            None,
        )
        if line is None:  # set aside example by example: by range unless a verified line took part
            cells[all(when in by_range for when in c.get("known_bug_examples", {}))] += 1
        else:
            cells[line in by_range] += 1
    return cells[0], cells[1], examples[0], examples[1]


def _cell(c: dict) -> tuple[str, str, str]:
    return c["property"], c["layer"], c["dtype"]


def table(out: Path) -> str:
    """The markdown table of every ``DIR/<version>`` a ``gate`` run left."""
    lines = [
        "| release | exit | passed | failed | xfailed cells (verified + by range) | examples set aside "
        "(verified + by range) | skipped | error | lines applied (by range) | unmatched `when` lines "
        "| failed/error cells by property | wall time | arguments after `--report DIR` |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    dirs = sorted(
        (d for d in out.iterdir() if (d / "wall.json").exists()),
        key=lambda d: [int(p) for p in d.name.split(".")],
    )
    for d in dirs:
        wall = json.loads((d / "wall.json").read_text())
        rpath = d / "report.json"
        if not rpath.exists():
            lines.append(
                f"| {d.name} | {wall['exit']} | no report | | | | | | | | | {_wall(wall)} | {_extra(wall)} |"
            )
            continue
        if "wrong_release" in wall:
            lines.append(f"| {d.name} | {wall['wrong_release']}: not counted | | | | | | | | | | | |")
            continue
        report = json.loads(rpath.read_text())
        c, h = report["counts"], report["header"]
        applied = h.get("xfails_applied", [])
        by_range = h.get("xfails_by_range", [])
        per_property: dict[str, int] = {}
        for x in report["cells"]:
            if x["status"] in ("failed", "error"):
                per_property[x["property"]] = per_property.get(x["property"], 0) + 1
        bad = [f"{p} ({n})" for p, n in sorted(per_property.items())]
        unmatched = [u for u in h.get("unmatched_xfails", []) if " when " in u]
        cv, cr, ev, er = xfail_split(report)
        # A gate stopped early (Ctrl-C) still writes complete reports of the cells it finished: say so.
        status = (
            f"{wall['exit']}, stopped after {len(report['cells'])} cells"
            if h.get("interrupted")
            else wall["exit"]
        )
        lines.append(
            f"| {d.name} | {status} | {c['passed']} | {c['failed']} | {c['xfailed']} ({cv} + {cr}) "
            f"| {ev + er} ({ev} + {er}) | {c['skipped']} | {c['error']} | {len(applied)} ({len(by_range)}) "
            f"| {len(unmatched)} | {'; '.join(bad) if bad else 'none'} | {_wall(wall)} | {_extra(wall)} |"
        )
    return "\n".join(lines) + "\n"


def _wall(wall: dict) -> str:
    """``612 s (load 9–14)``: the wall time, and the machine's 1-minute load average while it ran."""
    if "load_min" not in wall:
        return f"{wall['wall_s']:.0f} s"
    return f"{wall['wall_s']:.0f} s (load {wall['load_min']:.0f}–{wall['load_max']:.0f})"


def _extra(wall: dict) -> str:
    """The gate's own arguments (``--layers ...``, ``--properties ...``), or ``?`` if not recorded."""
    if "extra" not in wall:
        return "?"
    return f"`{' '.join(wall['extra'])}`" if wall["extra"] else "none"


def repro_table(json_path: Path) -> str:
    """The markdown matrix (script x release) of a ``repro --json`` file."""
    data = json.loads(json_path.read_text())
    versions = [v for v in RELEASES if any(v in by for by in data.values())]
    lines = ["| script | " + " | ".join(versions) + " |", "|---|" + "---|" * len(versions)]
    for name in sorted(data):
        cells = [data[name].get(v, {}).get("verdict", "-") for v in versions]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("repro", help="run the PEFT repro scripts in each release's env")
    p.add_argument("versions", nargs="*", default=RELEASES)
    p.add_argument("--json", help="merge the verdicts into this JSON file")
    p.add_argument(
        "--only", default="*", help="scripts peft_ONLY.py (globs, comma-separated), e.g. dora_merge,model_*"
    )
    p = sub.add_parser("gate", help="run the ci gate in each release's env, one after another")
    p.add_argument("versions", nargs="*", default=RELEASES)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `run` arguments")
    p = sub.add_parser("table", help="the markdown table of a gate run's DIR")
    p.add_argument("out", type=Path)
    p = sub.add_parser("repro-table", help="the markdown matrix of a repro --json file")
    p.add_argument("json_path", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "repro":
        return repro(args.versions, args.json, args.only)
    if args.cmd == "gate":
        return gate(args.versions, args.out, args.jobs, args.nice, args.extra)
    if args.cmd == "repro-table":
        print(repro_table(args.json_path), end="")
        return 0
    print(table(args.out), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
