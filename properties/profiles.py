"""Hypothesis profiles: how hard each cell searches."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    max_examples: int
    derandomize: bool  # same examples on every run, whatever the seed argument
    target_ratio: bool  # hypothesis.target() on log(ratio) to climb toward the worst case
    cell_timeout_s: float  # a cell running longer is reported as a hang
    samples_kept: int  # samples stored per cell for reports


PROFILES = {
    "ci": Profile(
        "ci", max_examples=12, derandomize=True, target_ratio=False, cell_timeout_s=120, samples_kept=64
    ),
    "dev": Profile(
        "dev", max_examples=50, derandomize=False, target_ratio=False, cell_timeout_s=300, samples_kept=200
    ),
    "thorough": Profile(
        "thorough",
        max_examples=400,
        derandomize=False,
        target_ratio=True,
        cell_timeout_s=1800,
        samples_kept=400,
    ),
}
