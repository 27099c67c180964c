"""``report.json``: the machine-readable report (schema in SCHEMA.md), written atomically.

The file is strict JSON (no ``NaN`` / ``Infinity`` tokens, which many parsers reject): a non-finite
float is stored as the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` and turned back into a float
by ``load_report`` for the fields typed ``float``.
"""

from __future__ import annotations

import json
import math
import os
import typing
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import Any

from properties.reporting._atomic import atomic_write
from properties.results import SCHEMA_VERSION, CellResult, RunHeader, RunReport, Sample

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class ReportError(ValueError):
    """The file is not a report this version of the suite can read."""


def encode_floats(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by their strict-JSON string names."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: encode_floats(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [encode_floats(v) for v in obj]
    return obj


def to_json_obj(report: RunReport) -> dict[str, Any]:
    """The JSON document for ``report`` (plain dicts / lists, non-finite floats as strings)."""
    from properties.quantized import tolerance as quantized

    doc = report.to_json()
    q = quantized.rows(report)
    if q:  # derived from the cells' samples; readers ignore it
        doc["quantized_merge_tolerances"] = q
    return encode_floats(doc)


def dumps(doc: dict[str, Any]) -> str:
    """The report's text: the top level indented, one line per cell.

    Indenting every sample (``json.dump(indent=...)``) runs Python's pure-Python encoder over the
    whole document, seconds for a ci report that is rewritten every few seconds; a cell per line goes
    through the C encoder and stays readable (and ``grep``-able) by cell."""
    parts = []
    for key, value in doc.items():
        if key == "cells" and value:
            cells = ",\n  ".join(json.dumps(c, allow_nan=False) for c in value)
            parts.append(f' "cells": [\n  {cells}\n ]')
        else:
            parts.append(
                f" {json.dumps(key)}: " + json.dumps(value, indent=1, allow_nan=False).replace("\n", "\n ")
            )
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_json(report: RunReport, path: str | os.PathLike[str]) -> Path:
    """Write ``report`` to ``path`` atomically: readers see the old file or the whole new one."""
    text = dumps(to_json_obj(report))
    return atomic_write(path, lambda f: f.write(text))


@cache
def _float_fields(cls: type) -> frozenset[str]:
    hints = typing.get_type_hints(cls)
    return frozenset(f.name for f in fields(cls) if float in (hints[f.name], *typing.get_args(hints[f.name])))


def _decode_floats(d: dict[str, Any], cls: type) -> dict[str, Any]:
    names = _float_fields(cls)
    return {k: _NONFINITE.get(v, v) if k in names and isinstance(v, str) else v for k, v in d.items()}


def from_json_obj(doc: Any, source: str = "report") -> RunReport:
    """Validate and decode a JSON document; ``ReportError`` says what is wrong with it."""
    if not isinstance(doc, dict) or not {"header", "cells"} <= doc.keys():
        raise ReportError(f"{source}: not a LoRA conformance report (no 'header' / 'cells')")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ReportError(
            f"{source}: unknown schema_version {version!r}; this reader knows {SCHEMA_VERSION} "
            "(use the suite version that wrote it)"
        )
    try:
        cells = []
        for c in doc["cells"]:
            c = _decode_floats(c, CellResult)
            c["samples"] = [_decode_floats(s, Sample) for s in c.get("samples", [])]
            cells.append(c)
        return RunReport.from_json(
            {"schema_version": version, "header": _decode_floats(doc["header"], RunHeader), "cells": cells}
        )
    except (TypeError, KeyError, AttributeError) as e:
        raise ReportError(f"{source}: malformed schema_version {version} report: {e}") from e


def load_report(path: str | os.PathLike[str]) -> RunReport:
    """Read a ``report.json`` written by ``write_json`` (or the ``cells.jsonl`` journal of a dead run)."""
    if str(path).endswith(".jsonl"):
        from properties.reporting.journal import read_journal

        try:
            return read_journal(path)
        except UnicodeDecodeError as e:
            raise ReportError(f"{path}: not a LoRA conformance journal (not UTF-8 text)") from e
    try:
        text = Path(path).read_text(encoding="utf-8")
        doc = json.loads(text)
    except UnicodeDecodeError as e:
        raise ReportError(f"{path}: not a LoRA conformance report (not UTF-8 text)") from e
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not a LoRA conformance report (invalid JSON: {e})") from e
    return from_json_obj(doc, str(path))
