"""Make and use one virtualenv per PEFT release, so the PEFT target is checked against real releases.

Usage::

    python scripts/peft_envs.py create 0.7.1 0.13.2 0.21.2
    python scripts/peft_envs.py run 0.7.1 -- python -m pytest tests/test_peft_target.py
    python scripts/peft_envs.py list

Each environment lives in ``envs/peft-<version>/`` (git-ignored) and holds this repo (editable),
``torch==2.13.0`` and the PEFT release paired with a ``transformers`` (and ``accelerate``) release of
the same period: old PEFT releases leave both unpinned, and today's releases no longer import with
them. torch is always pinned, because an unpinned resolve pulls multi-GB CUDA wheels.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENVS = REPO / "envs"
TORCH = "torch==2.13.0"

# PEFT release (major.minor) -> companions released around the same time. Releases not listed get the
# pairing of the nearest older listed one; the newest entry leaves transformers 5 free, which needs
# huggingface_hub >= 1 (pip resolves that by itself).
PAIRS: dict[tuple[int, int], list[str]] = {
    (0, 7): ["transformers==4.36.2", "accelerate==0.25.0", "huggingface_hub<0.24", "numpy<2"],
    (0, 8): ["transformers==4.38.2", "accelerate==0.27.2", "huggingface_hub<0.24", "numpy<2"],
    (0, 9): ["transformers==4.38.2", "accelerate==0.27.2", "huggingface_hub<0.24", "numpy<2"],
    (0, 10): ["transformers==4.40.2", "accelerate==0.29.3", "huggingface_hub<0.24", "numpy<2"],
    (0, 11): ["transformers==4.41.2", "accelerate==0.30.1", "huggingface_hub<0.25"],
    (0, 12): ["transformers==4.43.4", "accelerate==0.33.0", "huggingface_hub<0.25"],
    (0, 13): ["transformers==4.45.2", "accelerate==1.0.1", "huggingface_hub<0.27"],
    (0, 14): ["transformers==4.47.1", "accelerate==1.2.1", "huggingface_hub<0.28"],
    (0, 15): ["transformers==4.50.3", "accelerate==1.6.0", "huggingface_hub<0.31"],
    (0, 16): ["transformers==4.52.4", "accelerate==1.7.0", "huggingface_hub<0.33"],
    (0, 17): ["transformers==4.56.2", "accelerate==1.10.1", "huggingface_hub<0.36"],
    (0, 18): ["transformers==4.57.6", "accelerate==1.11.0", "huggingface_hub<1.0"],
    (0, 19): ["transformers>=5,<6", "accelerate>=1.12"],
}
TEST_DEPS = ["pytest>=8", "hypothesis>=6.100"]


def companions(version: str) -> list[str]:
    """The pinned companions of a PEFT release (see ``PAIRS``)."""
    major, minor = (int(p) for p in version.split(".")[:2])
    older = [k for k in PAIRS if k <= (major, minor)]
    if not older:
        raise SystemExit(f"peft {version}: older than every paired release (0.7.0 is the oldest supported)")
    return PAIRS[max(older)]


def env_dir(version: str) -> Path:
    return ENVS / f"peft-{version}"


def env_python(version: str) -> Path:
    return env_dir(version) / "bin" / "python"


def create(version: str) -> float:
    """Create (or refresh) ``envs/peft-<version>``; returns the seconds it took."""
    start = time.monotonic()
    venv.create(env_dir(version), with_pip=True, clear=False)
    reqs = [TORCH, f"peft=={version}", *companions(version), *TEST_DEPS]
    cmd = [str(env_python(version)), "-m", "pip", "install", "-q", *reqs, "-e", str(REPO)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    took = time.monotonic() - start
    print(f"peft-{version}: ready in {took:.0f} s", flush=True)
    return took


def run(version: str, command: list[str]) -> int:
    """Run ``command`` with the environment's ``bin/`` first on PATH; returns its exit status."""
    if not env_python(version).exists():
        raise SystemExit(f"no environment for peft {version}: run `create {version}` first")
    bindir = str(env_dir(version) / "bin")
    env = {
        **os.environ,
        "VIRTUAL_ENV": str(env_dir(version)),
        "PATH": bindir + os.pathsep + os.environ["PATH"],
    }
    env.pop("PYTHONHOME", None)
    return subprocess.run(command, cwd=REPO, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_create = sub.add_parser("create", help="create envs/peft-<version> for each version")
    p_create.add_argument("versions", nargs="+")
    p_run = sub.add_parser("run", help="run a command inside envs/peft-<version>")
    p_run.add_argument("version")
    p_run.add_argument("command", nargs=argparse.REMAINDER, help="-- command...")
    sub.add_parser("list", help="list the environments that exist")
    args = parser.parse_args(argv)

    if args.cmd == "create":
        for v in args.versions:
            create(v)
        return 0
    if args.cmd == "run":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            parser.error("run needs a command after --")
        return run(args.version, command)
    for d in sorted(ENVS.glob("peft-*")):
        print(d.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
