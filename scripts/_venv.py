"""The virtualenv plumbing ``scripts/envs.py`` and ``scripts/peft_envs.py`` share, written once.

Each environment under ``envs/`` holds pinned torch (unpinned, pip pulls multi-GB CUDA wheels), its own
requirements, the test tools and this repo (editable). Both scripts take ``create | run | list``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENVS = REPO / "envs"
TORCH = "torch==2.13.0"
TEST_DEPS = ["pytest>=8", "hypothesis>=6.100"]


def python_of(env: Path) -> Path:
    return env / "bin" / "python"


def create(env: Path, requirements: list[str], overlay: bool = False) -> float:
    """Create (or refresh) ``env`` with torch, ``requirements`` and the test tools; returns the seconds.

    ``overlay``: the env reuses this interpreter's torch (and torch's own dependencies) through a ``.pth``
    file instead of installing its own copy: a gigabyte and minutes less per env. Only torch's closure is
    shared, not the whole site-packages (``--system-site-packages`` would leak in packages such as a
    torchao that older transformers and PEFT releases import and then fail on).
    """
    start = time.monotonic()
    if not python_of(env).exists():
        # An existing env is only refreshed: re-creating it would copy the interpreter over one that a
        # running process may be executing ("Text file busy").
        venv.create(env, with_pip=True, clear=False)
    if overlay:
        _link_torch(env)
    cmd = [str(python_of(env)), "-m", "pip", "install", "-q", TORCH, *requirements, *TEST_DEPS]
    cmd += ["-e", str(REPO)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    took = time.monotonic() - start
    print(f"{env.name}: ready in {took:.0f} s", flush=True)
    return took


def _torch_closure() -> list[str]:
    """The top-level paths of torch and of every distribution it requires (recursively, no extras)."""
    import importlib.metadata as md
    import re

    seen: dict[str, md.Distribution] = {}
    todo = ["torch"]
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen[key] = md.distribution(name)
        for req in seen[key].requires or []:
            if "extra ==" not in req:
                todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    paths: set[str] = set()
    for dist in seen.values():
        for f in dist.files or []:
            top = f.parts[0]
            if top not in ("..", "__pycache__") and not top.endswith(".pth"):
                paths.add(str(dist.locate_file(top)))
    return sorted(paths)


def _link_torch(env: Path) -> None:
    """Make this interpreter's torch closure importable in ``env`` (and visible to its pip), no copy."""
    shared = ENVS / "_torch-shared"
    if not (shared / "torch").exists():
        shared.mkdir(parents=True, exist_ok=True)
        for path in _torch_closure():
            link = shared / Path(path).name
            if not link.exists():
                link.symlink_to(path)
    site = next((env / "lib").glob("python3*/site-packages"))
    (site / "_torch_shared.pth").write_text(str(shared) + "\n")


def run(env: Path, command: list[str], missing: str) -> int:
    """Run ``command`` with ``env``'s ``bin/`` first on PATH; returns its exit status.

    Exits with the message ``missing`` if ``env`` has not been created.
    """
    if not python_of(env).exists():
        raise SystemExit(missing)
    variables = {
        **os.environ,
        "VIRTUAL_ENV": str(env),
        "PATH": str(env / "bin") + os.pathsep + os.environ["PATH"],
    }
    variables.pop("PYTHONHOME", None)
    return subprocess.run(command, cwd=REPO, env=variables).returncode


def parse_args(
    argv: list[str] | None,
    doc: str | None,
    name: str,
    helps: tuple[str, str],
    choices: list[str] | None = None,
) -> argparse.Namespace:
    """Parse ``create NAMEs... | run NAME -- CMD... | list`` (``helps``: create's and run's help).

    ``choices`` restrict ``run``, and ``create`` with ``all`` added; ``args.command`` comes without ``--``.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_create = sub.add_parser("create", help=helps[0])
    p_create.add_argument(f"{name}s", nargs="+", choices=None if choices is None else [*choices, "all"])
    p_create.add_argument(
        "--overlay",
        action="store_true",
        help="reuse this interpreter's torch and test tools (system site packages); install only the rest",
    )
    p_run = sub.add_parser("run", help=helps[1])
    p_run.add_argument(name, choices=choices)
    p_run.add_argument("command", nargs=argparse.REMAINDER, help="-- command...")
    sub.add_parser("list", help="list the environments that exist")
    args = parser.parse_args(argv)
    if args.cmd == "run":
        args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not args.command:
            parser.error("run needs a command after --")
    return args
