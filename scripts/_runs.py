"""What the scripts that run the CLI many times and keep a record share (soundness sweep, nightly runs).

Both run ``lora-conformance run`` as a subprocess, time it, read the ``report.json`` it wrote, keep a
summary in a JSON file under ``docs/`` that is rewritten atomically after every run (so a stopped
sweep resumes where it stopped) and render that file as Markdown.
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Timed:
    """A finished subprocess and what it cost: wall-clock seconds and CPU seconds (user + system)."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float


def run_timed(cmd: list[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None) -> Timed:
    """Run ``cmd`` with this repo on ``PYTHONPATH``; its wall time and the CPU time of it and its children.

    CPU time is read from ``RUSAGE_CHILDREN`` before and after, so it counts every process the command
    waited for (the CLI's worker processes included). Run one command at a time for this to be exact.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timed(proc.returncode, proc.stdout, proc.stderr, wall, cpu)


def git_commit(root: Path = ROOT) -> str:
    """The checked-out commit (short hash), with ``+dirty`` when tracked files other than the records
    under ``docs/`` (which these scripts rewrite while they run) differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "diff", "--quiet", "HEAD", "--", ".", ":!docs"], cwd=root, capture_output=True
    )
    return head.stdout.strip() + ("+dirty" if dirty.returncode else "")


def report_number(v: object) -> float | None:
    """A number from report.json, which writes non-finite floats as strings ("Infinity", "NaN")."""
    if v is None:
        return None
    if isinstance(v, str):
        return float(v.replace("Infinity", "inf"))
    return float(v)  # type: ignore[arg-type]


def fmt(v: object) -> str:
    """Three significant digits, or an em dash for a missing value."""
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
