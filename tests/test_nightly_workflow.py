"""The GitHub Actions recipes in examples/ (nightly and every commit) are workflows that would do what the
README says.

It is parsed as YAML, its `lora-conformance` commands are parsed with the CLI's own parser (with the
`${{ ... }}` expressions filled in for every shard), and the plumbing between the jobs is checked: the
shards cover 1..n with one seed, each uploads the report it wrote, the merge job waits for all of them,
merges exactly what they uploaded, uploads report.html and ends with `compare` against a baseline.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

import pytest

from properties.cli import build_parser

yaml = pytest.importorskip("yaml")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# workflow file -> (its shard job, the profile it runs, whether every night draws new examples)
RECIPES = {
    "github-actions-nightly.yml": ("thorough", "thorough", True),
    "github-actions-commit.yml": ("gate", "ci", False),
}


@pytest.fixture(scope="module", params=sorted(RECIPES))
def recipe(request) -> tuple[dict, str, str, bool]:
    job, profile, new_seed = RECIPES[request.param]
    return yaml.safe_load((EXAMPLES / request.param).read_text()), job, profile, new_seed


@pytest.fixture(scope="module")
def workflow(recipe) -> dict:
    return recipe[0]


def _fill(text: str, shard: int) -> str:
    """The command as the runner would see it for ``shard`` (expressions and env variables filled)."""
    values = {"matrix.shard": str(shard), "github.run_number": "17", "github.run_id": "123456"}

    def expr(m: re.Match) -> str:
        key = m.group(1).strip()
        assert key in values, f"unexpected expression ${{{{ {key} }}}} in {text!r}"
        return values[key]

    text = re.sub(r"\$\{\{(.*?)\}\}", expr, text)
    return text.replace('"$TARGET"', "peft").replace("$TARGET", "peft")


def _commands(job: dict, shard: int = 1) -> list[list[str]]:
    """Every `lora-conformance ...` invocation of the job's run steps, split as a shell would."""
    out = []
    for step in job["steps"]:
        for line in _fill(step.get("run", ""), shard).splitlines():
            words = shlex.split(line)
            if words[:1] == ["lora-conformance"]:
                out.append(words[1:])
    return out


def _step(job: dict, uses: str) -> list[dict]:
    return [s for s in job["steps"] if s.get("uses", "").startswith(uses)]


def test_runs_nightly_or_on_every_commit(recipe):
    workflow, _, profile, _ = recipe
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    if profile == "thorough":
        assert "schedule" in triggers and triggers["schedule"][0]["cron"].count(" ") == 4
        assert "workflow_dispatch" in triggers
    else:
        assert "push" in triggers and "pull_request" in triggers


def test_the_shards_cover_1_to_n_with_the_profile_and_one_seed(recipe):
    workflow, job_name, profile, new_seed = recipe
    job = workflow["jobs"][job_name]
    shards = job["strategy"]["matrix"]["shard"]
    assert job["strategy"]["fail-fast"] is False  # one red shard must not cancel the others' reports
    n = len(shards)
    assert n >= 2 and sorted(shards) == list(range(1, n + 1))
    seeds = set()
    for i in shards:
        (run,) = [c for c in _commands(job, i) if c[0] == "run"]
        args = build_parser().parse_args(run)
        assert args.shard == (i, n)
        assert args.profile == profile and args.max_examples is None  # the profile's full count a cell
        assert args.target == "peft" and args.xfails == "auto"  # bundled known bugs, by release range
        assert args.seed is not None
        seeds.add(args.seed)
        # nightly: a new seed every night (the run number); every commit: one fixed seed, so a red gate
        # points at the commit, not at examples drawn for the first time
        assert ("run_number" in str(job["steps"])) == new_seed
        (upload,) = _step(job, "actions/upload-artifact")
        assert upload["if"] == "always()"  # a failing shard still hands in its report
        assert _fill(upload["with"]["path"], i) == f"{args.report}/report.json"
    assert len(seeds) == 1  # shards of one night must share the seed, or merge refuses them


def test_the_merge_job_needs_every_shard_and_merges_what_they_uploaded(recipe):
    workflow, job_name, _, _ = recipe
    shard_job = workflow["jobs"][job_name]
    merge = workflow["jobs"]["merge"]
    needs = merge["needs"] if isinstance(merge["needs"], list) else [merge["needs"]]
    assert needs == [job_name]
    assert merge["if"] == "always()"  # runs (and uploads the report) when a shard failed
    (download,) = _step(merge, "actions/download-artifact")
    uploaded = [_fill(_step(shard_job, "actions/upload-artifact")[0]["with"]["name"], i) for i in (1, 2)]
    assert all(fnmatch.fnmatch(name, download["with"]["pattern"]) for name in uploaded)
    commands = _commands(merge)
    assert [c[0] for c in commands] == ["merge", "compare"]  # merge first, compare last
    merged = build_parser().parse_args(commands[0])
    for i, name in enumerate(uploaded, 1):  # the glob picks up every shard's report.json where it lands
        landed = f"{download['with']['path']}/{name}/report.json"
        assert any(fnmatch.fnmatch(landed, pattern) for pattern in merged.shards), (i, landed)
    compare = build_parser().parse_args(commands[1])
    assert compare.current == f"{merged.out}/report.json"
    assert compare.baseline.endswith(".json") and compare.max_growth >= 1
    report_upload = [s for s in _step(merge, "actions/upload-artifact")]
    assert len(report_upload) == 1 and report_upload[0]["if"] == "always()"
    assert f"{merged.out}/report.html" in report_upload[0]["with"]["path"].split()
    last = merge["steps"][-1]
    assert "lora-conformance compare" in last["run"]  # the job's verdict is the comparison


def test_every_step_is_a_known_action_or_a_shell_command(workflow):
    for job in workflow["jobs"].values():
        assert job["runs-on"] and job["timeout-minutes"] > 0
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), step
            if "uses" in step:
                assert re.fullmatch(
                    r"actions/(checkout|setup-python|upload-artifact|download-artifact)@v\d+", step["uses"]
                )
            else:
                assert "pip install torch" not in step["run"].replace('"', "")  # never an unpinned torch
    assert workflow["env"]["TORCH"] == "torch==2.13.0"
