"""Make and use one virtualenv per PEFT release, so the PEFT target is checked against real releases.

Usage::

    python scripts/peft_envs.py create 0.7.1 0.13.2 0.21.2
    python scripts/peft_envs.py create --overlay 0.15.2   # reuse this interpreter's torch: faster
    python scripts/peft_envs.py run 0.7.1 -- python -m pytest tests/test_peft_target.py
    python scripts/peft_envs.py list

Each environment lives in ``envs/peft-<version>/`` (git-ignored) and holds this repo (editable),
``torch==2.13.0`` and the PEFT release paired with a ``transformers`` (and ``accelerate``) release of
the same period: old PEFT releases leave both unpinned, and today's releases no longer import with
them. torch is always pinned, because an unpinned resolve pulls multi-GB CUDA wheels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import _venv

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


def companions(version: str) -> list[str]:
    """The pinned companions of a PEFT release (see ``PAIRS``)."""
    major, minor = (int(p) for p in version.split(".")[:2])
    older = [k for k in PAIRS if k <= (major, minor)]
    if not older:
        raise SystemExit(f"peft {version}: older than every paired release (0.7.0 is the oldest supported)")
    return PAIRS[max(older)]


def env_dir(version: str) -> Path:
    return _venv.ENVS / f"peft-{version}"


def create(version: str, overlay: bool = False) -> float:
    """Create (or refresh) ``envs/peft-<version>``; returns the seconds it took (``overlay``: see _venv)."""
    return _venv.create(env_dir(version), [f"peft=={version}", *companions(version)], overlay)


def run(version: str, command: list[str]) -> int:
    """Run ``command`` inside ``envs/peft-<version>``; returns its exit status."""
    return _venv.run(
        env_dir(version), command, f"no environment for peft {version}: run `create {version}` first"
    )


def main(argv: list[str] | None = None) -> int:
    helps = ("create envs/peft-<version> for each version", "run a command inside envs/peft-<version>")
    args = _venv.parse_args(argv, __doc__, "version", helps)
    if args.cmd == "create":
        for v in args.versions:
            create(v, args.overlay)
        return 0
    if args.cmd == "run":
        return run(args.version, args.command)
    for d in sorted(_venv.ENVS.glob("peft-*")):
        print(d.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
