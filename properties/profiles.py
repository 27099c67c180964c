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
    shrink_seconds: float  # time Hypothesis may spend shrinking a failure (fail fast in CI)
    min_examples: int = 6  # floor for costly properties, which get max_examples / cost
    # One example running longer is a hang: it ends the cell at once (the worker is killed when the
    # target ignores the alarm). Generous: the slowest legitimate example (264 train forwards of a
    # conv3d through PEFT on a loaded machine) takes a few seconds.
    example_timeout_s: float = 30
    # A cell whose first this-many examples all matched known bugs (xfails ``when`` lines), with none
    # tested yet, ends ``xfailed`` at once. 0: Hypothesis's own rule (458 rejections with none valid:
    # 99% sure fewer than 1% of the examples are valid). In ci, 58 (95% sure fewer than 5% are valid)
    # saves drawing ~400 examples in each cell a known bug covers whole (a fifth of PEFT's gate).
    known_only_limit: int = 0

    def examples_for(self, cost: float) -> int:
        """Examples per cell for a property whose example costs ``cost`` ordinary ones."""
        return max(min(self.min_examples, self.max_examples), round(self.max_examples / cost))


PROFILES = {
    "ci": Profile(
        "ci", 12, True, False, cell_timeout_s=120, samples_kept=64, shrink_seconds=15, known_only_limit=58
    ),
    "dev": Profile("dev", 50, False, False, cell_timeout_s=300, samples_kept=200, shrink_seconds=60),
    "thorough": Profile(
        "thorough",
        400,
        False,
        True,
        cell_timeout_s=1800,
        samples_kept=400,
        shrink_seconds=300,
        example_timeout_s=60,
    ),
}
