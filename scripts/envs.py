"""Make and use one virtualenv per LoRA library, so each library target runs against the real package.

Usage::

    python scripts/envs.py create loralib          # or torchtune | litgpt | diffusers | lycoris | all
    python scripts/envs.py run loralib -- python -m pytest tests/test_library_targets.py
    python scripts/envs.py list

Each environment lives in ``envs/<lib>/`` (git-ignored) and holds ``torch==2.13.0``, this repo
(editable), the test tools and the library at the version its target was written against. The
libraries cannot share one environment: litgpt pins ``huggingface-hub<1.4`` while diffusers' PEFT
backend wants today's ``transformers`` (``huggingface-hub>=1``), and torchtune needs ``torchao``
pinned below the release that breaks its import. torch is always pinned, because an unpinned resolve
pulls multi-GB CUDA wheels. PEFT releases have their own script (``scripts/peft_envs.py``).
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
TEST_DEPS = ["pytest>=8", "hypothesis>=6.100"]

LIBRARIES: dict[str, list[str]] = {
    # No declared dependencies at all.
    "loralib": ["loralib==0.1.2"],
    # torchtune imports torchao without declaring it; torchao 0.18 breaks that import.
    "torchtune": ["torchtune==0.6.1", "torchao==0.17.0"],
    "litgpt": ["litgpt==0.5.13"],
    # The PEFT backend (fuse_lora/unfuse_lora) needs peft and transformers next to diffusers.
    "diffusers": ["diffusers==0.42.1", "peft==0.21.2", "transformers>=5,<6"],
    "lycoris": ["lycoris-lora==4.1.3"],
}


def env_dir(lib: str) -> Path:
    return ENVS / lib


def env_python(lib: str) -> Path:
    return env_dir(lib) / "bin" / "python"


def create(lib: str) -> float:
    """Create (or refresh) ``envs/<lib>``; returns the seconds it took."""
    start = time.monotonic()
    venv.create(env_dir(lib), with_pip=True, clear=False)
    cmd = [str(env_python(lib)), "-m", "pip", "install", "-q", TORCH, *LIBRARIES[lib], *TEST_DEPS]
    cmd += ["-e", str(REPO)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    took = time.monotonic() - start
    print(f"{lib}: ready in {took:.0f} s", flush=True)
    return took


def run(lib: str, command: list[str]) -> int:
    """Run ``command`` with the environment's ``bin/`` first on PATH; returns its exit status."""
    if not env_python(lib).exists():
        raise SystemExit(f"no environment for {lib}: run `python scripts/envs.py create {lib}` first")
    env = {
        **os.environ,
        "VIRTUAL_ENV": str(env_dir(lib)),
        "PATH": str(env_dir(lib) / "bin") + os.pathsep + os.environ["PATH"],
    }
    env.pop("PYTHONHOME", None)
    return subprocess.run(command, cwd=REPO, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_create = sub.add_parser("create", help="create envs/<lib> (one at a time: installs are heavy)")
    p_create.add_argument("libs", nargs="+", choices=[*LIBRARIES, "all"])
    p_run = sub.add_parser("run", help="run a command inside envs/<lib>")
    p_run.add_argument("lib", choices=list(LIBRARIES))
    p_run.add_argument("command", nargs=argparse.REMAINDER, help="-- command...")
    sub.add_parser("list", help="list the environments that exist")
    args = parser.parse_args(argv)

    if args.cmd == "create":
        libs = list(LIBRARIES) if "all" in args.libs else args.libs
        for lib in libs:
            create(lib)
        return 0
    if args.cmd == "run":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            parser.error("run needs a command after --")
        return run(args.lib, command)
    for lib in LIBRARIES:
        if env_python(lib).exists():
            print(lib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
