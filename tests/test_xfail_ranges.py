"""Known bugs by release range: ``[peft>=0.9,<0.14]`` on an xfails line, and how a run picks lines up."""

from __future__ import annotations

import json

import pytest

from properties import cli, xfails
from properties.releases import ReleaseRange, parse_range, version_key
from properties.xfails import applied_by_range, bundled_rules, for_release, parse_xfails
from tests.fixture_targets import ScaledDeltaTarget


def test_versions_compare_as_releases_do():
    assert version_key("0.14") == version_key("0.14.0")
    assert version_key("0.9.0") < version_key("0.10.0") < version_key("0.10.1")
    assert (
        version_key("0.14.0.dev0")
        < version_key("0.14.0rc1")
        < version_key("0.14.0")
        < version_key("0.14.0.post1")
    )
    assert version_key("2.13.0+cpu") == version_key("2.13.0")
    with pytest.raises(ValueError, match="not a release version"):
        version_key("latest")


def test_range_holds_its_lower_end_and_not_its_upper_end():
    rng, rest = parse_range("[peft>=0.14,<0.19] merge_subset * *  # x")
    assert rest.strip() == "merge_subset * *  # x"
    assert rng == ReleaseRange("peft", ((">=", "0.14"), ("<", "0.19")))
    assert str(rng) == "[peft>=0.14,<0.19]"
    assert [v for v in ("0.13.2", "0.14.0", "0.18.1", "0.19.0", "0.19.0rc1") if rng.contains(v)] == [
        "0.14.0",
        "0.18.1",
        "0.19.0rc1",  # a release candidate of 0.19 comes before 0.19: still in the range
    ]
    assert not rng.contains("not-a-version")
    assert rng.applies_to("peft", "0.15.2") and not rng.applies_to("diffusers", "0.15.2")
    open_ended, _ = parse_range("[peft>=0.17] x y z")
    assert open_ended.contains("0.22.0") and open_ended.contains("1.0")
    single, _ = parse_range("[peft==0.7.1] x y z")
    assert single.contains("0.7.1") and not single.contains("0.7.0")


@pytest.mark.parametrize(
    "line, message",
    [
        ("[peft 0.14] merge_subset * *", "expected"),
        ("[peft>=abc] merge_subset * *", "not a release version"),
        ("[peft>=0.14,] merge_subset * *", "bad clause"),
        ("[peft>=0.5,<0.4] merge_subset * *", "no release satisfies"),
        ("[>=0.5] merge_subset * *", "expected"),
    ],
)
def test_malformed_ranges_are_refused_with_the_line(line, message):
    with pytest.raises(ValueError, match=message) as e:
        parse_xfails("# header\n" + line + "  # reason\n")
    assert "xfails line 2" in str(e.value)


def test_lines_without_a_range_read_as_before():
    rules = parse_xfails("merge_subset * * when adapters > 1  # partial\nscaling_law embedding *  # noop\n")
    assert [r.release for r in rules] == [None, None]
    assert str(rules[0]) == "line 1: merge_subset * * when adapters > 1"
    ranged = parse_xfails("[peft>=0.9,<0.14] merge_subset * * when adapters > 1  # partial\n", "x.txt")[0]
    assert ranged.condition == "adapters > 1" and ranged.reason == "partial"
    assert str(ranged) == "line 1: [peft>=0.9,<0.14] merge_subset * * when adapters > 1 (from x.txt)"


def test_a_user_file_applies_only_the_lines_whose_range_holds_the_release():
    rules = parse_xfails(
        "scaling_law embedding *  # every release\n"
        "[peft>=0.9,<0.14] merge_subset * *  # old\n"
        "[peft>=0.14] merge_order * *  # new\n"
        "[diffusers>=0.1] merge_idempotent * *  # another library\n",
        "mine.txt",
    )
    assert [r.line for r in for_release(rules, "peft", "0.13.2")] == [1, 2]
    assert [r.line for r in for_release(rules, "peft", "0.21.2")] == [1, 3]
    assert [r.line for r in for_release(rules, "loralib", "0.1.2")] == [1]
    ranged = [r.line for r in rules if applied_by_range(r, "peft", "0.21.2")]
    assert ranged == [2, 3, 4]  # unranged lines are the user's own claim, not extrapolated


@pytest.fixture
def bundled(tmp_path, monkeypatch):
    """A bundled-xfails folder with two releases' files of the fixture target ``scaled-delta``."""
    monkeypatch.setattr(xfails, "BUNDLED", tmp_path)
    (tmp_path / "scaled-delta-1.0.0.txt").write_text(
        "# verified on 1.0.0; the bug is there from 1.0 and fixed in 2.0\n"
        "[scaled-delta>=1.0,<2.0] merge_equivalence linear float32  # merges 1% too much\n"
        "merge_roundtrip linear float32  # only on 1.0.0 (unranged: this release alone)\n"
        "[scaled-delta>=0.5] scaling_law embedding *  # shared\n"
    )
    (tmp_path / "scaled-delta-2.0.0.txt").write_text(
        "[scaled-delta>=0.5] scaling_law embedding *  # shared, the same pattern\n"
        "[scaled-delta>=2.0] merge_order * *  # from 2.0 on\n"
    )
    (tmp_path / "other-1.5.0.txt").write_text("[other>=1.0] merge_order * *  # another library\n")
    return tmp_path


def test_bundled_lines_are_picked_by_range_and_the_own_file_wins(bundled):
    own = bundled_rules("scaled-delta", "1.0.0")
    assert own.exact == bundled / "scaled-delta-1.0.0.txt"
    assert [(r.source, r.line) for r in own.rules] == [
        ("scaled-delta-1.0.0.txt", 2),
        ("scaled-delta-1.0.0.txt", 3),
        ("scaled-delta-1.0.0.txt", 4),  # the 2.0.0 file's copy of the same pattern is dropped
    ]
    assert own.by_range == []

    between = bundled_rules("scaled-delta", "1.5.0")  # no file of its own
    assert between.exact is None
    assert [str(r) for r in between.rules] == [
        "line 2: [scaled-delta>=1.0,<2.0] merge_equivalence linear float32 (from scaled-delta-1.0.0.txt)",
        # the 2.0.0 file is nearer than the 1.0.0 file's copy of the same pattern (a tie: newer first)
        "line 1: [scaled-delta>=0.5] scaling_law embedding * (from scaled-delta-2.0.0.txt)",
    ]
    assert between.by_range == between.rules
    assert "0 verified on this release, 2 by range" in between.describe()

    later = bundled_rules("scaled-delta", "3.1.0")
    assert [(r.source, r.line) for r in later.rules] == [
        ("scaled-delta-2.0.0.txt", 1),
        ("scaled-delta-2.0.0.txt", 2),
    ]
    assert bundled_rules("scaled-delta", "0.1.0").rules == []


class ReleasedScaledDelta(ScaledDeltaTarget):
    """The fixture target that merges 1% too much, at a release with no bundled file of its own."""

    def __init__(self, release: str):
        super().__init__()
        self.release = release

    def version(self) -> str:
        return self.release


TARGET = ReleasedScaledDelta("1.5.0")  # between the two bundled files
FIXED = ReleasedScaledDelta("2.0.0")  # the first release past the range


def test_a_release_without_its_own_file_gates_with_the_ranged_lines(bundled, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["run", "--target", "tests.test_xfail_ranges:TARGET", "--properties", "merge_equivalence"]
    argv += ["--max-examples", "4", "--dtypes", "float32", "--layers", "linear", "--report", str(out)]
    assert cli.main(argv) == 0  # the known bug (a failing cell) is xfailed by the 1.0.0 file's range
    printed = capsys.readouterr().out
    assert "applied by release range, not verified on 1.5.0" in printed
    report = json.loads((out / "report.json").read_text())
    assert [c["status"] for c in report["cells"]] == ["xfailed"]
    header = report["header"]
    line = "line 2: [scaled-delta>=1.0,<2.0] merge_equivalence linear float32 (from scaled-delta-1.0.0.txt)"
    assert line in header["xfails_by_range"] and line in header["xfails_applied"]
    assert header["xfail_files"] == ["scaled-delta-1.0.0.txt", "scaled-delta-2.0.0.txt"]
    md = (out / "report.md").read_text()
    assert "applied by release range (2)" in md and "not verified on this exact release" in md


def test_a_release_past_the_range_fails_on_the_bug(bundled, tmp_path):
    out = tmp_path / "report"
    argv = ["run", "--target", "tests.test_xfail_ranges:FIXED", "--properties", "merge_equivalence"]
    argv += ["--max-examples", "4", "--dtypes", "float32", "--layers", "linear", "--report", str(out)]
    assert cli.main(argv) == 1
    report = json.loads((out / "report.json").read_text())
    assert [c["status"] for c in report["cells"]] == ["failed"]
    assert report["header"]["xfails_by_range"] == []  # its own file: verified, nothing by range


def test_every_bundled_line_applies_to_its_own_release_and_equal_patterns_share_a_range():
    """A line whose range leaves out its own file's release would never be verified anywhere, and two
    copies of one bug (same pattern) with different ranges would make the answer depend on the file."""
    ranges: dict[tuple, set[str]] = {}
    for target in ("peft", "loralib", "torchtune", "litgpt", "diffusers", "lycoris", "keras"):
        for version, path in xfails.bundled_files(target):
            for rule in xfails.load_xfails(path):
                if rule.release is not None:
                    assert rule.release.applies_to(target, version), f"{path.name}: {rule}"
                    ranges.setdefault((target, rule.pattern), set()).add(str(rule.release))
            assert bundled_rules(target, version).by_range == [] or target == "peft"
    assert ranges, "the PEFT files carry release ranges"
    assert {k: v for k, v in ranges.items() if len(v) > 1} == {}
