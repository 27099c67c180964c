"""pytest plugin: run the conformance suite inside a library's own test run.

    pytest --pyargs properties --lora-target peft [--lora-profile ci] [--lora-xfails FILE] [--lora-report DIR]

Each cell (property x layer x dtype) is one test item, so ``-k``, ``-x`` and pytest-xdist (``-n 2``)
work as usual. Cells run in a worker process, as on the command line: a target that crashes its
process or hangs in native code fails that item (``--lora-in-process`` turns this off for debugging).
Results travel to the controlling process in the items' ``user_properties``, where the reports are
written once at the end. Without ``--lora-target`` the plugin does nothing.
"""

from __future__ import annotations

import pytest

RESULT_KEY = "lora_conformance_cell"


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("lora-conformance", "LoRA conformance suite")
    g.addoption("--lora-target", help="target: reference, peft, ... or module:attribute")
    g.addoption("--lora-profile", default="ci", choices=("ci", "dev", "thorough"))
    g.addoption("--lora-seed", type=int, default=None, help="global seed (default 0 for ci, else random)")
    g.addoption("--lora-max-examples", type=int, default=None)
    g.addoption("--lora-properties", default="", help="comma-separated property ids")
    g.addoption("--lora-layers", default="", help="comma-separated layer kinds and/or architectures")
    g.addoption("--lora-dtypes", default="", help="comma-separated dtypes")
    g.addoption("--lora-xfails", default="auto", help="expected-failure file; 'auto': the bundled one")
    g.addoption("--lora-report", default=None, help="directory for report.json/.md/.html")
    g.addoption("--lora-device", default="cpu")
    g.addoption(
        "--lora-example-timeout",
        type=float,
        default=None,
        help="seconds before one example counts as hung (default: the profile's)",
    )
    g.addoption(
        "--lora-in-process",
        action="store_true",
        help="run cells in the pytest process instead of a worker (debugging: a target that crashes "
        "its process then ends the test run, and a hang in native code is not caught)",
    )


def _csv(text: str) -> list[str] | None:
    return [t for t in text.split(",") if t] or None


def _options(config: pytest.Config):
    """The run options, the same on every xdist worker (the seed is fixed on the controller)."""
    import dataclasses
    import random

    from properties.profiles import PROFILES
    from properties.runner import RunOptions

    profile = PROFILES[config.getoption("lora_profile")]
    if config.getoption("lora_example_timeout"):
        profile = dataclasses.replace(profile, example_timeout_s=config.getoption("lora_example_timeout"))
    seed = config.getoption("lora_seed")
    if seed is None:
        workerinput = getattr(config, "workerinput", None)
        seed = int(workerinput["lora_seed"]) if workerinput else (0 if profile.derandomize else None)
        if seed is None:
            seed = config._lora_seed = getattr(config, "_lora_seed", random.randrange(2**31))
    return RunOptions(
        target=config.getoption("lora_target"),
        profile=profile,
        seed=seed,
        max_examples=config.getoption("lora_max_examples"),
        device=config.getoption("lora_device"),
        xfails=config.getoption("lora_xfails"),
    )


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist controller: hand the same random seed to every worker."""
    node.workerinput["lora_seed"] = _options(node.config).seed


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "lora_cell" not in metafunc.fixturenames:
        return
    config = metafunc.config
    if not config.getoption("lora_target"):
        skip = pytest.mark.skip(reason="pass --lora-target NAME to run the LoRA conformance suite")
        metafunc.parametrize("lora_cell", [pytest.param(None, marks=skip)], ids=["no-target"])
        return
    from properties.session import plan_cells

    cells = plan_cells(
        _csv(config.getoption("lora_properties")),
        _csv(config.getoption("lora_layers")),
        _csv(config.getoption("lora_dtypes")),
    )
    metafunc.parametrize("lora_cell", cells, ids=[f"{c.property}-{c.layer}-{c.dtype}" for c in cells])


@pytest.fixture(scope="session")
def lora_run(pytestconfig: pytest.Config):
    """The target and options, loaded once per process."""
    from properties.session import start_run
    from properties.targets.registry import TargetLoadError
    from properties.xfails import record_xfails

    opts = _options(pytestconfig)
    try:
        run = start_run(opts.target, opts, _xfail_rules(pytestconfig, opts.target))
    except TargetLoadError as e:
        pytest.exit(f"lora-conformance: {e}", returncode=2)
    header = run.report.header
    record_xfails(header, run.xfails, header.target, header.target_version)
    return run


def _xfail_rules(config: pytest.Config, target_name: str):
    from properties.targets.registry import load_target
    from properties.xfails import bundled_rules, for_release, load_xfails

    given = config.getoption("lora_xfails")
    if given == "none":
        return []
    target = load_target(target_name)
    if given != "auto":  # a user's file may carry release ranges too
        return for_release(load_xfails(given), target.name, target.version())
    return bundled_rules(target.name, target.version()).rules


@pytest.fixture(scope="session")
def lora_worker(lora_run, pytestconfig: pytest.Config):
    """One worker process per pytest process (per xdist worker), reused for every cell and replaced
    when a target kills it: a segfault or ``os._exit`` fails one item instead of the test run."""
    if pytestconfig.getoption("lora_in_process"):
        yield None
        return
    from properties.workers import WorkerPool

    with WorkerPool(lora_run.target_name, 1, device=lora_run.opts.device) as pool:
        yield pool


@pytest.fixture
def lora_cell_runner(lora_run, lora_worker, request: pytest.FixtureRequest):
    """Runs a cell and reports it the pytest way (fail / skip / xfail with the replay command)."""
    from properties.catalogue import all_properties
    from properties.console import failure_details
    from properties.results import RunReport
    from properties.runner import run_cell
    from properties.session import apply_xfail

    def run(cell) -> None:
        if lora_worker is None:
            result = run_cell(lora_run.target, all_properties()[cell.property], cell, lora_run.opts)
        else:
            result = lora_worker.run_one(cell, lora_run.opts)
        result = apply_xfail(result, lora_run.xfails, set())
        request.node.user_properties.append((RESULT_KEY, result.to_json()))
        if result.status == "skipped":
            pytest.skip(result.message or "skipped")
        if result.status == "xfailed":
            pytest.xfail(result.message or "expected failure")
        if result.status in ("failed", "error"):
            pytest.fail(failure_details(RunReport(lora_run.report.header, [result])).strip(), pytrace=False)

    return run


class _Collector:
    def __init__(self) -> None:
        self.cells: list[dict] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for key, value in getattr(report, "user_properties", ()):
            if key == RESULT_KEY and report.when == "call":
                self.cells.append(value)


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("lora_target", None) and not hasattr(config, "workerinput"):
        config._lora_collector = _Collector()
        config.pluginmanager.register(config._lora_collector, "lora-conformance-collector")


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    collector = getattr(config, "_lora_collector", None)
    out = config.getoption("lora_report", None)
    if collector is None or not out:
        return
    from datetime import datetime, timezone

    from properties import reporting
    from properties.results import CellResult
    from properties.session import start_run

    opts = _options(config)
    run = start_run(opts.target, opts, _xfail_rules(config, opts.target))
    run.report.cells = [CellResult.from_json(c) for c in collector.cells]
    run.report.header.interrupted = session.shouldstop is not False or session.shouldfail is not False
    run.report.header.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    paths = reporting.write_reports(run.report, out)
    config.get_terminal_writer().line(f"lora-conformance reports: {', '.join(map(str, paths.values()))}")
