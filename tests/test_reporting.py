"""Reporting layer: atomic JSON, Markdown / HTML rendering, run comparison and shard merging."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import math
import re
import sys

import pytest

from properties.reporting import (
    ReportError,
    ShardMergeError,
    compare,
    load_report,
    merge_reports,
    render_html,
    render_markdown,
    write_json,
    write_reports,
)
from properties.reporting.markdown import fence
from properties.reporting.tolerances import recommend
from properties.results import CellResult, RunHeader, RunReport, Sample

REPLAY = "lora-conformance replay merge_equivalence linear bfloat16 --seed 1234 --example 'AXicY2A'"


def _header(**kw) -> RunHeader:
    base = dict(
        suite_version="0.1.0",
        target="peft",
        target_version="0.13.2",
        torch_version="2.13.0",
        python_version="3.11.2",
        platform="linux-x86_64",
        device="cpu",
        precision_flags={"matmul_precision": "highest"},
        profile="ci",
        seed=1234,
        max_examples=50,
        started="2025-01-01T00:00:00",
        finished="2025-01-01T00:05:00",
    )
    return RunHeader(**{**base, **kw})


def _samples(n: int, scale: float, cycles: bool = False) -> list[Sample]:
    out = []
    for i in range(n):
        k = 2 ** (2 + i % 8)
        cyc = (1, 10, 100, 1000)[i % 4] if cycles else None
        out.append(
            Sample(
                ratio=scale * (1 + i) / n,
                err_u=math.sqrt(k) * (0.2 + (i % 5) / 5),
                inner_dim=k,
                rank=1 + i % 16,
                quantity="weights after n cycles" if cycles else "merged vs unmerged output",
                cycles=cyc,
                error=scale * 1e-6 * (1 + i % 3),
                bound=1e-5,
                magnitude=2.0,
                reference=1.0 if i % 4 else 1e-3,
            )
        )
    return out


def _cell(prop: str, layer: str, dtype: str, status: str, samples=(), **kw) -> CellResult:
    cell = CellResult(prop, layer, dtype, status, examples=len(samples), samples=list(samples), **kw)
    cell.summarize()
    return cell


def make_report(**header) -> RunReport:
    cells = [
        _cell("merge_equivalence", "linear", "float32", "passed", _samples(12, 0.3)),
        _cell(
            "merge_equivalence",
            "linear",
            "bfloat16",
            "failed",
            _samples(6, 3.0),
            message="ratio 3.0 > 1 at index (0, 3)",
            example="LinearSpec(in=8, out=4, r=2, alpha=64)",
            replay=REPLAY,
        ),
        _cell("merge_unmerge_roundtrip", "linear", "bfloat16", "passed", _samples(8, 0.1, cycles=True)),
        _cell("merge_equivalence", "conv2d", "float16", "skipped", message="no fp16 conv on CPU"),
        _cell("safe_merge", "embedding", "float16", "xfailed", message="known upstream bug"),
    ]
    return RunReport(header=_header(**header), cells=cells)


# --- JSON -------------------------------------------------------------------------------------------


def test_json_round_trip_is_equal(tmp_path):
    report = make_report()
    path = write_json(report, tmp_path / "report.json")
    assert load_report(path) == report
    assert json.loads(path.read_text())["counts"]["failed"] == 1


def test_json_is_strict_and_keeps_non_finite_floats(tmp_path):
    report = make_report()
    report.cells[0].samples[0].ratio = math.inf
    report.cells[0].samples[1].err_u = math.nan
    path = write_json(report, tmp_path / "r.json")

    def reject(token):
        raise AssertionError(f"non-standard JSON token {token}")

    json.loads(path.read_text(), parse_constant=reject)
    back = load_report(path).cells[0].samples
    assert back[0].ratio == math.inf
    assert math.isnan(back[1].err_u)
    assert load_report(path).cells[0].message is None


def test_failed_write_leaves_old_file_and_no_temp_files(tmp_path):
    path = tmp_path / "report.json"
    write_json(make_report(), path)
    before = path.read_bytes()
    broken = make_report()
    broken.cells[-1].message = object()  # json.dump fails after streaming part of the document
    with pytest.raises(TypeError):
        write_json(broken, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_load_rejects_unknown_version_and_non_reports(tmp_path):
    doc = json.loads(write_json(make_report(), tmp_path / "r.json").read_text())
    doc["schema_version"] = 99
    (tmp_path / "v99.json").write_text(json.dumps(doc))
    with pytest.raises(ReportError, match="unknown schema_version 99"):
        load_report(tmp_path / "v99.json")
    (tmp_path / "other.json").write_text('{"name": "package.json"}')
    with pytest.raises(ReportError, match="not a LoRA conformance report"):
        load_report(tmp_path / "other.json")
    (tmp_path / "junk.json").write_text("<html>")
    with pytest.raises(ReportError, match="invalid JSON"):
        load_report(tmp_path / "junk.json")
    del doc["cells"][0]["property"]
    doc["schema_version"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ReportError, match="malformed"):
        load_report(tmp_path / "bad.json")


# --- Markdown ---------------------------------------------------------------------------------------


def test_markdown_has_verdict_counts_failure_and_replay():
    md = render_markdown(make_report())
    assert md.startswith("## ❌ LoRA conformance: FAIL — peft 0.13.2")
    assert "5 cells: 2 passed, 1 failed, 1 skipped, 1 xfailed" in md
    assert f"```sh\n{REPLAY}\n```" in md
    assert "```\nLinearSpec(in=8, out=4, r=2, alpha=64)\n```" in md
    assert "#### ❌ merge_equivalence · linear · bfloat16 (failed)" in md
    row = next(line for line in md.splitlines() if line.startswith("| merge_equivalence | linear |"))
    assert "❌ FAIL 3" in row and "✅ pass 0.3" in row


def test_markdown_tolerance_table_lists_merge_equivalence_with_defaults():
    md = render_markdown(make_report())
    rows = [line for line in md.splitlines() if line.startswith("| linear | float32 |")]
    assert len(rows) == 1
    assert "1.3e-06" in rows[0] and "1e-05" in rows[0]
    assert "| merge_unmerge_roundtrip |" not in md.split("Tolerances")[1]


def test_passing_report_says_pass():
    report = make_report()
    report.cells = [c for c in report.cells if c.status != "failed"]
    md = render_markdown(report)
    assert md.startswith("## ✅ LoRA conformance: PASS")
    assert "Failures" not in md


def test_markdown_counts_known_bug_examples_per_xfails_line(tmp_path):
    report = make_report()
    line = "line 3: * conv* * when dora and groups > 1"
    report.cells[0].known_bug_examples = {line: 4}
    report.cells[2].known_bug_examples = {line: 2}
    md = render_markdown(report)
    assert "Known bugs set aside (1 lines)" in md
    assert f"| `{line}` | 2 | 6 |" in md
    assert load_report(write_json(report, tmp_path / "r.json")) == report
    assert "Known bugs set aside" not in render_markdown(make_report())


def test_fence_outgrows_backticks_in_text():
    block = fence("a ``` b")
    assert block.startswith("````\n") and block.endswith("\n````")


def test_recommended_tolerances_cover_samples_with_stated_margin():
    samples = [
        Sample(ratio=0.1, err_u=1, inner_dim=4, rank=1, error=1e-6, magnitude=2.0, reference=1.0),
        Sample(ratio=0.1, err_u=1, inner_dim=4, rank=1, error=2e-7, magnitude=1.0, reference=1e-3),
    ]
    advice = recommend(samples, "float32")
    assert advice.rtol == pytest.approx(4e-6)
    assert advice.atol == pytest.approx(8e-7)
    assert (advice.default_rtol, advice.default_atol) == (1.3e-6, 1e-5)
    assert advice.defaults_hold == 2
    assert recommend([], "float32") is None


# --- HTML -------------------------------------------------------------------------------------------


def test_html_is_self_contained_with_plots():
    html = render_html(make_report())
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    assert "<link" not in html and "<script" not in html
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 3  # ratio by property, err_u vs K / ratio vs rank, drift
    assert all(base64.b64decode(img).startswith(b"\x89PNG") for img in images)
    assert REPLAY.replace("'", "&#x27;") in html
    assert html.count("<table") >= 5


def test_html_without_matplotlib_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    html = render_html(make_report())
    assert "matplotlib is not installed" in html
    assert "<img" not in html


# --- compare ----------------------------------------------------------------------------------------


def test_compare_identical_reports_is_ok():
    result = compare(make_report(), make_report())
    assert result.ok
    assert result.changes == []
    assert result.format().startswith("OK: no regressions")


def test_compare_flags_pass_to_fail():
    current = make_report()
    current.cells[0] = dataclasses.replace(current.cells[0], status="failed")
    result = compare(make_report(), current)
    assert not result.ok
    [reg] = result.regressions
    assert reg.cell == ("merge_equivalence", "linear", "float32") and reg.what == "passed → failed"
    assert "REGRESSED: 1 regression" in result.format()


def test_compare_flags_ratio_growth_and_ignores_noise():
    current = make_report()
    current.cells[2].max_ratio *= 10
    result = compare(make_report(), current)
    [reg] = result.regressions
    assert reg.cell == ("merge_unmerge_roundtrip", "linear", "bfloat16") and "×10" in reg.what
    base, cur = make_report(), make_report()
    base.cells[2].max_ratio, cur.cells[2].max_ratio = 1e-6, 5e-4  # both below the floor
    assert compare(base, cur).ok


def test_compare_reports_new_missing_fixed_and_header_as_info():
    base = make_report()
    current = make_report(torch_version="2.14.0")
    current.cells[1] = dataclasses.replace(current.cells[1], status="passed")
    moved = current.cells.pop(3)
    current.cells.append(dataclasses.replace(moved, layer="conv3d"))
    result = compare(base, current)
    assert result.ok
    whats = {(c.severity, c.what) for c in result.changes}
    assert {("info", "missing cell"), ("info", "new cell"), ("header", "torch_version")} <= whats
    assert ("info", "fixed (failed → passed)") in whats
    assert "2.14.0" in result.format()


# --- shards -----------------------------------------------------------------------------------------


def _shards(n: int = 3) -> list[RunReport]:
    full = make_report()
    return [
        RunReport(header=_header(shard=f"{i + 1}/{n}"), cells=copy.deepcopy(full.cells[i::n]))
        for i in range(n)
    ]


def test_merge_three_shards():
    shards = _shards()
    shards[1].header.interrupted = True
    merged = merge_reports(list(reversed(shards)))
    assert merged.header.shard is None and merged.header.interrupted
    assert merged.counts() == make_report().counts()
    assert [c.key for c in merged.cells] == [
        ("merge_equivalence", "linear", "float32"),
        ("merge_equivalence", "linear", "bfloat16"),
        ("merge_equivalence", "conv2d", "float16"),
        ("merge_unmerge_roundtrip", "linear", "bfloat16"),
        ("safe_merge", "embedding", "float16"),
    ]  # property, then layers and dtypes in the spec's order
    assert merge_reports(shards).cells == merged.cells


def test_merge_rejects_duplicates_mismatches_and_gaps():
    shards = _shards()
    shards[2].cells.append(copy.deepcopy(shards[0].cells[0]))
    with pytest.raises(ShardMergeError, match="appears in shard 1/3 and shard 3/3"):
        merge_reports(shards)
    shards = _shards()
    shards[1].header.seed = 99
    with pytest.raises(ShardMergeError, match="seed differs"):
        merge_reports(shards)
    with pytest.raises(ShardMergeError, match="missing shards: 2/3"):
        merge_reports([_shards()[0], _shards()[2]])
    with pytest.raises(ShardMergeError, match="same shard given twice: 1/3"):
        merge_reports([*_shards(), _shards()[0]])
    with pytest.raises(ShardMergeError, match="not a shard report"):
        merge_reports([make_report()])
    partial = merge_reports([_shards()[0]], allow_partial=True)
    assert partial.header.interrupted and len(partial.cells) == 2


# --- write_reports ----------------------------------------------------------------------------------


def test_write_reports_writes_each_format(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # plots are covered above; keep this fast
    paths = write_reports(make_report(), tmp_path / "out")
    assert {k: p.name for k, p in paths.items()} == {
        "json": "report.json",
        "md": "report.md",
        "html": "report.html",
    }
    assert load_report(paths["json"]) == make_report()
    assert REPLAY in paths["md"].read_text()
    with pytest.raises(ValueError, match="unknown report format"):
        write_reports(make_report(), tmp_path / "other", formats=("json", "pdf"))
    assert not (tmp_path / "other").exists()


def test_empty_and_sample_free_reports_render(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    empty = RunReport(header=_header(finished=None, interrupted=True))
    md = render_markdown(empty)
    assert "NO CELLS" in md and "interrupted" in md
    bare = RunReport(header=_header(), cells=[_cell("safe_merge", "mha", "float32", "error", message="boom")])
    assert "```\nboom\n```" in render_markdown(bare)
    assert "<pre>boom</pre>" in render_html(bare)


def test_non_finite_ratio_shows_as_inf_and_regresses():
    current = make_report()
    current.cells[0].samples.append(Sample(ratio=math.inf, err_u=math.inf, inner_dim=4, rank=1))
    current.cells[0].status = "failed"
    row = next(
        line for line in render_markdown(current).splitlines() if "| merge_equivalence | linear |" in line
    )
    assert "❌ FAIL inf" in row
    assert not compare(make_report(), current).ok


def test_exact_zeros_do_not_set_atol():
    samples = [
        Sample(ratio=0, err_u=0, inner_dim=4, rank=1, error=0.0, magnitude=1.0, reference=0.0),
        Sample(ratio=0.1, err_u=1, inner_dim=4, rank=1, error=1e-6, magnitude=2.0, reference=1.0),
    ]
    assert recommend(samples, "float32").atol == pytest.approx(4e-6)
