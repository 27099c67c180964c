"""What a run measured: plain data handed from the runner to reporting (and read back by ``compare``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Status = Literal["passed", "failed", "error", "skipped", "xfailed"]
STATUSES: tuple[Status, ...] = ("passed", "failed", "error", "skipped", "xfailed")
SCHEMA_VERSION = 1


@dataclass
class Sample:
    """One numeric comparison of one example: the worst element's error against its bound.

    ``ratio = error / bound`` (the gate is ``ratio <= 1``); ``err_u`` is the error in units of
    ``u * M`` (u: unit roundoff of the dtype, M: the magnitude bound), to compare with ``sqrt(K)``.
    """

    ratio: float
    err_u: float
    inner_dim: int
    rank: int
    quantity: str = "output"  # what was compared: output, weight, delta, ...
    cycles: int | None = None  # merge/unmerge cycles, for drift measurements
    error: float = 0.0
    bound: float = 0.0
    magnitude: float = 0.0  # M at the worst element (|x||W| + |s||x||A||B| ...), for rtol/atol advice
    reference: float = 0.0  # |exact value| at the worst element


@dataclass
class CellResult:
    """One cell: property x layer kind x dtype."""

    property: str
    layer: str
    dtype: str
    status: Status
    examples: int = 0
    duration_s: float = 0.0
    max_ratio: float | None = None
    median_ratio: float | None = None
    p99_ratio: float | None = None
    max_err_u: float | None = None
    median_err_u: float | None = None
    p99_err_u: float | None = None
    message: str | None = None  # why it failed / errored / was skipped / xfailed
    example: str | None = None  # the shrunk failing example, human-readable
    worst_example: str | None = None  # the example that produced max_ratio
    replay: str | None = None  # one-line command replaying the failure
    seed: int | None = None
    samples: list[Sample] = field(default_factory=list)  # capped; for plots
    # xfails 'when' line -> examples of this cell set aside as that known bug
    known_bug_examples: dict[str, int] = field(default_factory=dict)
    # reason -> examples set aside because a stored intermediate may exceed the dtype's range
    out_of_range_examples: dict[str, int] = field(default_factory=dict)
    # quantity -> the bias test over the cell's examples (``properties.bias``): z, eps, candidate, ...
    bias: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_bias_z: float | None = None  # the largest |z| over quantities; the test fires above bias.Z_THRESHOLD

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.property, self.layer, self.dtype)

    def summarize(self) -> None:
        """Fill the max / median / p99 fields from ``samples``."""
        # A NaN ratio (NaN output) is as bad as it gets: count it as infinite, never drop it.
        ratios = sorted(math.inf if math.isnan(s.ratio) else s.ratio for s in self.samples)
        errs = sorted(s.err_u for s in self.samples if not math.isnan(s.err_u))  # NaN: statistical
        if ratios:
            self.max_ratio, self.median_ratio, self.p99_ratio = _stats(ratios)
        if errs:
            self.max_err_u, self.median_err_u, self.p99_err_u = _stats(errs)

    def to_json(self) -> dict[str, Any]:
        """Plain data, as ``dataclasses.asdict`` gives it, without its generic deep copy (which cost
        more than the rest of a report's encoding: a ci report holds thousands of samples)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["samples"] = [dict(vars(s)) for s in self.samples]
        d["known_bug_examples"] = dict(self.known_bug_examples)
        d["out_of_range_examples"] = dict(self.out_of_range_examples)
        d["bias"] = {q: dict(v) for q, v in self.bias.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CellResult:
        d = dict(d)
        d["samples"] = [Sample(**s) for s in d.get("samples", [])]
        return cls(**d)


def _stats(values: list[float]) -> tuple[float, float, float]:
    n = len(values)
    return values[-1], values[n // 2], values[min(n - 1, math.ceil(0.99 * n) - 1)]


@dataclass
class RunHeader:
    """Everything needed to reproduce a run and to tell two runs apart."""

    suite_version: str
    target: str
    target_version: str
    torch_version: str
    python_version: str
    platform: str
    device: str
    precision_flags: dict[str, Any]
    profile: str
    seed: int
    max_examples: int | None
    started: str
    finished: str | None = None
    interrupted: bool = False
    shard: str | None = None  # "i/n"
    argv: list[str] = field(default_factory=list)
    hypothesis_version: str = ""
    unmatched_xfails: list[str] = field(default_factory=list)
    # The xfails lines this run applied (those whose release range holds the target's version), the files
    # they came from, and those applied by range: taken from another release's file, not verified on this one.
    xfails_applied: list[str] = field(default_factory=list)
    xfail_files: list[str] = field(default_factory=list)
    xfails_by_range: list[str] = field(default_factory=list)


@dataclass
class RunReport:
    header: RunHeader
    cells: list[CellResult] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for c in self.cells:
            out[c.status] += 1
        return out

    @property
    def ok(self) -> bool:
        return not any(c.status in ("failed", "error") for c in self.cells)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "header": asdict(self.header),
            "counts": self.counts(),
            "cells": [c.to_json() for c in self.cells],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunReport:
        return cls(
            header=RunHeader(**d["header"]),
            cells=[CellResult.from_json(c) for c in d["cells"]],
            schema_version=d.get("schema_version", SCHEMA_VERSION),
        )
