"""Make and use one virtualenv per LoRA library, so each library target runs against the real package.

Usage::

    python scripts/envs.py create loralib  # torchtune litgpt diffusers lycoris adapters keras all
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

import subprocess
import sys
from pathlib import Path

import _venv

LIBRARIES: dict[str, list[str]] = {
    # No declared dependencies at all.
    "loralib": ["loralib==0.1.2"],
    # torchtune imports torchao without declaring it; torchao 0.18 breaks that import.
    "torchtune": ["torchtune==0.6.1", "torchao==0.17.0"],
    "litgpt": ["litgpt==0.5.13"],
    # The PEFT backend (fuse_lora/unfuse_lora) needs peft and transformers next to diffusers.
    "diffusers": ["diffusers==0.42.1", "peft==0.21.2", "transformers>=5,<6"],
    "lycoris": ["lycoris-lora==4.1.3"],
    # adapter-hub `adapters` pins its own transformers (~=4.57.6), older than the suite's 5.x.
    "adapters": ["adapters==1.3.0", "transformers==4.57.6"],
    # Keras 3 runs on the torch backend (KERAS_BACKEND=torch); h5py/ml-dtypes/optree come with it. What
    # keras-hub imports (regex, tokenizers) and the reference's adapter files (safetensors) come too.
    "keras": ["keras==3.15.1", "regex==2026.11.19", "tokenizers==0.23.3", "safetensors==0.8.0"],
}
# Installed with --no-deps after the rest: keras-hub 0.32.0 declares tensorflow-text (so TensorFlow), which
# nothing the suite uses imports on the torch backend.
NO_DEPS: dict[str, list[str]] = {"keras": ["keras-hub==0.32.0"]}


def env_dir(lib: str) -> Path:
    return _venv.ENVS / lib


def create(lib: str, overlay: bool = False) -> float:
    """Create (or refresh) ``envs/<lib>``; returns the seconds it took (``overlay``: see _venv)."""
    took = _venv.create(env_dir(lib), LIBRARIES[lib], overlay)
    if NO_DEPS.get(lib):
        cmd = [str(_venv.python_of(env_dir(lib))), "-m", "pip", "install", "-q", "--no-deps", *NO_DEPS[lib]]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return took


def run(lib: str, command: list[str]) -> int:
    """Run ``command`` inside ``envs/<lib>``; returns its exit status."""
    missing = f"no environment for {lib}: run `python scripts/envs.py create {lib}` first"
    return _venv.run(env_dir(lib), command, missing)


def main(argv: list[str] | None = None) -> int:
    helps = ("create envs/<lib> (one at a time: installs are heavy)", "run a command inside envs/<lib>")
    args = _venv.parse_args(argv, __doc__, "lib", helps, choices=list(LIBRARIES))
    if args.cmd == "create":
        for lib in list(LIBRARIES) if "all" in args.libs else args.libs:
            create(lib, args.overlay)
        return 0
    if args.cmd == "run":
        return run(args.lib, args.command)
    for lib in LIBRARIES:
        if _venv.python_of(env_dir(lib)).exists():
            print(lib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
